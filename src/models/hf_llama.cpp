#include "models/hf_llama.h"

#include <charconv>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/json_util.h"
#include "core/safetensors.h"
#include "core/staged_dir.h"

namespace dlcm {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace {

// The shortest decimal that reads back as f (1e-05 rather than 9.999999747378752e-06), so the
// config shows the value the user set.
double decimal_of(float f) {
  char buf[48];
  auto r = std::to_chars(buf, buf + sizeof buf, f);
  *r.ptr = 0;
  return std::strtod(buf, nullptr);
}

std::string join(const std::string& dir, const std::string& file) {
  return (fs::path(dir) / file).string();
}

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

}  // namespace

std::string hf_safetensors_dtype(const std::string& dtype, const std::string& flag) {
  if (dtype == "f32") return "F32";
  if (dtype == "bf16") return "BF16";
  if (dtype == "f16") return "F16";
  fail(flag, ": expected f32, bf16 or f16, got '", dtype, "'");
}

i64 parse_byte_size(const std::string& text, const std::string& flag) {
  size_t pos = 0;
  while (pos < text.size() && (std::isdigit(uint8_t(text[pos])) || text[pos] == '.')) ++pos;
  const std::string num = text.substr(0, pos), unit = text.substr(pos);
  static const std::pair<const char*, double> units[] = {
      {"", 1},      {"B", 1},         {"KB", 1e3},      {"MB", 1e6},  {"GB", 1e9},
      {"KiB", 1024}, {"MiB", 1048576}, {"GiB", 1073741824.0}};
  double mult = 0;
  for (auto& [u, m] : units)
    if (unit == u) mult = m;
  char* end = nullptr;
  const double v = num.empty() ? -1 : std::strtod(num.c_str(), &end);
  DLCM_CHECK(mult > 0 && end && *end == 0 && v >= 0, flag, ": expected a size in bytes such as "
             "2000000000, 500MB or 2GiB, got '", text, "'");
  const double bytes = v * mult;
  DLCM_CHECK(bytes >= 1000 && bytes <= 1e15, flag, ": ", text, " is outside [1KB, 1PB]");
  return i64(bytes);
}

ordered_json hf_llama_config_json(const Config& cfg, const std::string& torch_dtype) {
  const ModelConfig& m = cfg.model;
  const LlamaHParams hp = llama_hparams(m);
  ordered_json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["hidden_size"] = hp.hidden;
  j["intermediate_size"] = hp.intermediate;
  j["num_attention_heads"] = hp.n_heads;
  j["num_key_value_heads"] = hp.n_kv_heads;
  j["head_dim"] = hp.head_dim;
  j["num_hidden_layers"] = hp.n_layers;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = decimal_of(m.norm_eps);
  j["rope_theta"] = decimal_of(m.rope_theta);
  j["rope_scaling"] = nullptr;
  j["vocab_size"] = hp.vocab;
  j["max_position_embeddings"] = hp.max_pos;
  j["tie_word_embeddings"] = hp.tied;
  j["bos_token_id"] = hp.bos;
  j["eos_token_id"] = hp.eos;
  j["pad_token_id"] = hp.pad;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = false;
  j["pretraining_tp"] = 1;
  j["initializer_range"] = decimal_of(m.mup.enabled ? m.mup.sigma_base : m.init_std);
  j["use_cache"] = true;
  j["torch_dtype"] = torch_dtype;
  j["dlcm_config"] = config_to_json(cfg);
  return j;
}

void write_hf_llama(const std::string& dir, const Config& cfg, const ParamStore& ps,
                    const HfExportOptions& o, const std::string& source) {
  const std::vector<NamedTensor> ts = to_llama_layout(cfg.model, ps, source);
  const std::string dt = hf_safetensors_dtype(o.dtype, "--dtype");
  const i64 es = dt == "F32" ? 4 : 2;
  DLCM_CHECK(o.shard_size > 0, "--shard-size: must be positive, got ", o.shard_size);
  // Shards as save_pretrained cuts them: tensors in order, a new file when the next tensor
  // would push the current one past the limit (a tensor larger than the limit gets its own).
  std::vector<std::vector<size_t>> shards;
  i64 cur = 0, total = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const i64 bytes = ts[i].numel() * es;
    if (shards.empty() || (cur > 0 && cur + bytes > o.shard_size)) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += bytes;
    total += bytes;
  }
  const size_t n = shards.size();
  json weight_map = json::object();
  for (size_t s = 0; s < n; ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, n);
    const std::string file = n == 1 ? "model.safetensors" : name;
    std::vector<TensorToWrite> w;
    for (size_t i : shards[s]) {
      w.push_back({ts[i].name, ts[i].shape, ts[i].values(), nullptr, dt});
      weight_map[ts[i].name] = file;
    }
    write_safetensors(join(dir, file), w, {{"format", "pt"}});
  }
  if (n > 1) {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_text_file_synced(join(dir, "model.safetensors.index.json"), index.dump(2) + "\n");
  }
  const char* torch_dtype = dt == "F32" ? "float32" : dt == "BF16" ? "bfloat16" : "float16";
  write_text_file_synced(join(dir, "config.json"),
                         hf_llama_config_json(cfg, torch_dtype).dump(2) + "\n");
  const ModelConfig& m = cfg.model;
  ordered_json gen;
  gen["bos_token_id"] = m.bos_id;
  gen["eos_token_id"] = m.eos_id;
  gen["pad_token_id"] = m.pad_id;
  write_text_file_synced(join(dir, "generation_config.json"), gen.dump(2) + "\n");
}

HfLlamaModel read_hf_llama_config(const std::string& dir) {
  std::error_code ec;
  DLCM_CHECK(fs::is_directory(dir, ec), dir, ": no such folder (expected a transformers model "
             "folder with config.json and model.safetensors)");
  const std::string src = join(dir, "config.json");
  DLCM_CHECK(fs::exists(src, ec), dir, ": no config.json (expected a folder written by "
             "transformers' save_pretrained)");
  const json j = read_json_file_bounded(src);
  DLCM_CHECK(j.is_object(), src, ": expected a JSON object, got ", j.type_name());
  auto get = [&](const char* k) -> const json* {
    auto it = j.find(k);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  auto integer = [&](const char* k, i64 def, bool required) -> i64 {
    const json* v = get(k);
    DLCM_CHECK(v || !required, src, ": '", k, "' is missing");
    if (!v) return def;
    DLCM_CHECK(v->is_number_integer() && v->get<i64>() >= 0, src, ": '", k,
               "' must be a non-negative integer, got ", json_excerpt(*v));
    return v->get<i64>();
  };
  auto number = [&](const char* k, double def) -> double {
    const json* v = get(k);
    if (!v) return def;
    DLCM_CHECK(v->is_number() && v->get<double>() > 0, src, ": '", k,
               "' must be a positive number, got ", json_excerpt(*v));
    return v->get<double>();
  };
  auto flag = [&](const char* k) -> bool {
    const json* v = get(k);
    if (!v) return false;
    DLCM_CHECK(v->is_boolean(), src, ": '", k, "' must be true or false, got ", json_excerpt(*v));
    return v->get<bool>();
  };

  HfLlamaModel h;
  const json* type = get("model_type");
  DLCM_CHECK(type && type->is_string(), src, ": 'model_type' is missing; expected \"llama\"");
  DLCM_CHECK(*type == "llama", src, ": 'model_type' is ", json_excerpt(*type),
             "; only \"llama\" (LlamaForCausalLM) folders are imported");
  if (const json* a = get("architectures")) {
    bool ok = false;
    if (a->is_array())
      for (const json& s : *a) ok = ok || s == "LlamaForCausalLM";
    DLCM_CHECK(ok, src, ": 'architectures' is ", json_excerpt(*a),
               "; only LlamaForCausalLM is imported");
  }
  // Features the baseline does not compute: refused rather than silently dropped.
  if (const json* v = get("rope_scaling"))
    fail(src, ": 'rope_scaling' is ", json_excerpt(*v), "; dlcm's RoPE has no scaling (only "
         "models with rope_scaling null are imported)");
  if (const json* v = get("sliding_window"))
    fail(src, ": 'sliding_window' is ", json_excerpt(*v), "; the baseline attends the whole "
         "causal context (only models without a sliding window are imported)");
  DLCM_CHECK(!flag("attention_bias"), src, ": 'attention_bias' is true; dlcm's attention has no "
             "biases");
  DLCM_CHECK(!flag("mlp_bias"), src, ": 'mlp_bias' is true; dlcm's SwiGLU has no biases");
  if (const json* v = get("hidden_act"))
    DLCM_CHECK(*v == "silu", src, ": 'hidden_act' is ", json_excerpt(*v),
               "; dlcm's SwiGLU uses silu");
  if (const json* v = get("partial_rotary_factor"))
    DLCM_CHECK(v->is_number() && v->get<double>() == 1.0, src, ": 'partial_rotary_factor' is ",
               json_excerpt(*v), "; dlcm rotates the whole head (1.0)");
  if (const json* v = get("quantization_config"))
    fail(src, ": 'quantization_config' is set (", json_excerpt(*v), "); dlcm imports float "
         "weights only (dequantize first)");

  // LlamaConfig's defaults for absent keys.
  LlamaHParams& hp = h.hp;
  hp.hidden = integer("hidden_size", 0, true);
  hp.intermediate = integer("intermediate_size", 0, true);
  hp.n_heads = integer("num_attention_heads", 0, true);
  hp.n_layers = integer("num_hidden_layers", 0, true);
  hp.vocab = integer("vocab_size", 0, true);
  DLCM_CHECK(hp.n_heads > 0, src, ": 'num_attention_heads' must be at least 1");
  hp.n_kv_heads = integer("num_key_value_heads", hp.n_heads, false);
  hp.head_dim = integer("head_dim", hp.hidden / hp.n_heads, false);
  hp.max_pos = integer("max_position_embeddings", 2048, false);
  hp.rms_eps = number("rms_norm_eps", 1e-6);
  hp.rope_theta = number("rope_theta", 10000.0);
  hp.tied = flag("tie_word_embeddings");
  // Special ids: eos may be a list (several stop tokens; dlcm stops at one).
  auto special = [&](const char* k, i64 def) -> i64 {
    const json* v = get(k);
    if (v && v->is_array() && !v->empty()) {
      if (v->size() > 1)
        h.notes.push_back(std::string("'") + k + "' lists " + std::to_string(v->size()) +
                          " ids; dlcm uses the first, " + json_excerpt((*v)[0]));
      v = &(*v)[0];
    }
    if (!v) return def;
    DLCM_CHECK(v->is_number_integer() && v->get<i64>() >= 0 && v->get<i64>() < hp.vocab, src,
               ": '", k, "' = ", json_excerpt(*v), " is not a token id in [0, vocab_size)");
    return v->get<i64>();
  };
  hp.bos = i32(special("bos_token_id", -1));
  hp.eos = i32(special("eos_token_id", -1));
  hp.pad = i32(special("pad_token_id", -1));
  DLCM_CHECK(hp.eos >= 0 || hp.bos >= 0, src, ": neither 'bos_token_id' nor 'eos_token_id' is "
             "set; dlcm needs both (set them in config.json)");
  if (hp.bos < 0) {
    hp.bos = hp.eos;
    h.notes.push_back("'bos_token_id' is null; dlcm uses eos_token_id " + std::to_string(hp.eos));
  }
  if (hp.eos < 0) {
    hp.eos = hp.bos;
    h.notes.push_back("'eos_token_id' is null; dlcm uses bos_token_id " + std::to_string(hp.bos));
  }
  if (hp.pad < 0) {
    hp.pad = hp.eos;
    h.notes.push_back("'pad_token_id' is null; dlcm pads with eos_token_id " +
                      std::to_string(hp.eos));
  }
  h.config = llama_dlcm_config(hp, src);

  // A dlcm export carries its own config: take it back when it still describes this model.
  if (const json* d = get("dlcm_config")) {
    try {
      Config r = config_from_json(*d, src + " (dlcm_config)");
      check_llama_expressible(r.model, src + " (dlcm_config)");
      const LlamaHParams q = llama_hparams(r.model);
      const bool same = q.hidden == hp.hidden && q.intermediate == hp.intermediate &&
                        q.n_heads == hp.n_heads && q.n_kv_heads == hp.n_kv_heads &&
                        q.head_dim == hp.head_dim && q.n_layers == hp.n_layers &&
                        q.vocab == hp.vocab && q.max_pos == hp.max_pos &&
                        float(q.rms_eps) == float(hp.rms_eps) &&
                        float(q.rope_theta) == float(hp.rope_theta) && q.bos == hp.bos &&
                        q.eos == hp.eos && q.pad == hp.pad;
      if (same) {
        h.config = r;
        h.restored = true;
      } else {
        h.notes.push_back("'dlcm_config' no longer matches the transformers keys (the folder "
                          "was edited?); ignored, importing the plain LLaMA config");
      }
    } catch (const Error& e) {
      h.notes.push_back(std::string("'dlcm_config' ignored: ") + e.what());
    }
  }
  return h;
}

void read_hf_llama_weights(const std::string& dir, const HfLlamaModel& h, ParamStore& ps) {
  std::error_code ec;
  const std::string index = join(dir, "model.safetensors.index.json");
  const std::string single = join(dir, "model.safetensors");
  std::map<std::string, std::string> where;  // tensor name -> file path
  std::map<std::string, SafeTensorsFile> files;
  if (fs::exists(index, ec)) {
    const json j = read_json_file_bounded(index, JsonLimits{8, size_t(64) << 20});
    DLCM_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), index,
               ": expected an object with a 'weight_map' of tensor name -> file name");
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      const json& f = it.value();
      DLCM_CHECK(f.is_string(), index, ": weight_map['", it.key(), "'] must be a file name, got ",
                 json_excerpt(f));
      const std::string name = f.get<std::string>();
      // Shards live beside the index: no paths out of the folder.
      DLCM_CHECK(!name.empty() && name.find('/') == std::string::npos && name != "." &&
                     name != "..",
                 index, ": weight_map['", it.key(), "'] = '", name,
                 "' is not a file name in this folder");
      const std::string path = join(dir, name);
      if (!files.count(path)) {
        DLCM_CHECK(fs::exists(path, ec), index, ": names shard '", name,
                   "', which is not in the folder (incomplete download?)");
        files.emplace(path, SafeTensorsFile(path));
      }
      DLCM_CHECK(files.at(path).has(it.key()), path, ": has no tensor '", it.key(),
                 "', which model.safetensors.index.json places there");
      where[it.key()] = path;
    }
  } else if (fs::exists(single, ec)) {
    auto& f = files.emplace(single, SafeTensorsFile(single)).first->second;
    for (const auto& e : f.entries()) where[e.first] = single;
  } else {
    const bool bin = fs::exists(join(dir, "pytorch_model.bin"), ec) ||
                     fs::exists(join(dir, "pytorch_model.bin.index.json"), ec);
    fail(dir, bin ? ": holds PyTorch .bin weights only; dlcm reads safetensors (convert in "
                    "Python: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir, "
                    "safe_serialization=True))"
                  : ": no model.safetensors or model.safetensors.index.json");
  }

  std::map<std::string, bool> expected;
  for (const auto& [ours, hf] : llama_name_map(h.config.model)) expected[hf] = true;
  for (const auto& [name, path] : where) {
    if (expected.count(name) || ends_with(name, ".rotary_emb.inv_freq")) continue;  // buffer
    DLCM_CHECK(!ends_with(name, ".bias"), path, ": tensor '", name, "' is a bias; dlcm's LLaMA "
               "has no biases");
    fail(path, ": unexpected tensor '", name, "' (not part of LlamaForCausalLM with ",
         h.hp.n_layers, " layers; does config.json match the weights?)");
  }
  LlamaTensorReader read = [&](const std::string& name, const std::vector<i64>& shape,
                               float* out) {
    auto it = where.find(name);
    if (it == where.end()) return false;
    files.at(it->second).read_f32(name, shape, out);
    i64 n = 1;
    for (i64 d : shape) n *= d;
    const i64 bad = first_nonfinite(out, n);
    DLCM_CHECK(bad < 0, it->second, ": tensor '", name, "' holds a non-finite value at element ",
               bad);
    return true;
  };
  from_llama_layout(h.config.model, h.hp, read, ps, dir);
}

}  // namespace dlcm
