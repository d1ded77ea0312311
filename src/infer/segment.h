// Seeing the concepts (`dlcm segment`): a DLCM's boundary probabilities p over a text, the
// concepts at a threshold tau (b = [p >= tau] | forced), the tau that gives a wanted compression,
// and two renderings: coloured terminal text and one self-contained HTML page.
#pragma once
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm {

class LanguageModel;
class Tokenizer;

struct SegmentedText {
  std::string name;               // "text 1", a file name, ...
  std::vector<i32> ids;           // tokens as the model saw them (BOS first)
  std::vector<std::string> shown; // display text per token: whole UTF-8 characters (a character
                                  // split over tokens shows on the token that completes it)
  std::vector<float> p;           // boundary probability per token
  std::vector<uint8_t> forced;    // forced boundaries: window starts and BOS tokens
  std::vector<uint8_t> b;         // boundaries at tau (apply_tau)
  std::vector<i32> concept_index; // seg(t) = cumsum(b) - 1
  float tau = 0.5f;
  i64 windows = 1;                // model passes of at most max_seq_len tokens
  i32 bos_id = 1;

  i64 tokens() const { return i64(ids.size()); }
  i64 concepts() const;
  double tokens_per_concept() const { return double(tokens()) / double(std::max<i64>(concepts(), 1)); }
};

// b = [p >= tau] | forced, and the concept indices.
void apply_tau(SegmentedText& t, float tau);

// Display text per token from the raw bytes of each token: UTF-8 characters that span several
// tokens go to the token that completes them, invalid bytes become U+FFFD.
std::vector<std::string> display_pieces(const std::vector<std::string>& raw);

// The tau whose boundaries give `target` tokens per concept over all the texts together
// (bisection on tau; p is not recomputed). R(tau) is a nondecreasing step function from 1 (tau=0,
// every token a concept) to tokens/forced (only forced boundaries): a target outside that range
// gives the nearest end, and between steps the closer of the two neighbouring values is taken.
struct TauSearch {
  float tau = 0.5f;
  double R = 0;          // tokens per concept reached at tau
  double target = 0;
  double R_min = 1, R_max = 0;  // the reachable range
  i64 iterations = 0;
};
TauSearch find_tau_for_R(const std::vector<SegmentedText>& texts, double target);

// Runs the model over each text (BOS + tokens, in windows of max_seq_len tokens whose starts
// are forced boundaries) and fills ids, shown, p, forced; then apply_tau(tau) (tau < 0: the
// config's router.tau). Error when the model has no concepts (a baseline checkpoint) or a text
// is empty.
std::vector<SegmentedText> segment_texts(LanguageModel& m, const Tokenizer& tok,
                                         const std::vector<std::string>& names,
                                         const std::vector<std::string>& texts, float tau);

// Terminal rendering: each concept in its own colour (4 alternating ANSI 256-colour
// backgrounds) when color, else concepts separated by '|'; then a statistics line per text.
std::string render_terminal(const std::vector<SegmentedText>& texts, bool color);
// One statistics line: "name: N tokens (with BOS), M concepts, R tokens/concept, tau T".
std::string stats_line(const SegmentedText& t);

// A self-contained HTML page (inline CSS and JS, no external assets): per text a statistics
// table and the tokens coloured by p (heat map) with a bar at each concept boundary; a switch
// shows alternating concept colours instead; hovering a token shows it with its p and concept
// index. The script sets data-ok="1" on <body> when it ran (data-error on a script error), which
// the headless-browser test reads.
std::string render_html(const std::vector<SegmentedText>& texts, const std::string& title,
                        const std::string& subtitle);

}  // namespace dlcm
