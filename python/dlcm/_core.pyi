# Type stub of dlcm._core, the C++ engine's Python module (python/bindings). The docstrings are
# those of the module itself (a test checks that they agree).
import os
from typing import Any, Callable, Iterator, Literal, Sequence, overload

import numpy as np
import numpy.typing as npt

PathLike = str | os.PathLike[str]
Tokens = npt.ArrayLike  # integer ids, [B, L] or [L]; int32 in C order is read in place
Pair = tuple[str, str] | tuple[Sequence[int], Sequence[int]]

class Error(RuntimeError):
    """An error of the engine: its one-line message names the file, key or argument at fault and what was expected."""

class ArgumentError(Error, ValueError):
    """An argument with a wrong value or shape (also a ValueError)."""

class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type or dtype (also a TypeError)."""

class ClosedError(Error):
    """The model was closed."""

class Tokenizer:
    """A checkpoint's tokenizer (model.tokenizer)."""

    @property
    def kind(self) -> Literal["bpe", "bytes"]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str | bytes) -> list[int]:
        """Text -> token ids (no BOS/EOS)."""
    def decode(self, ids: Sequence[int] | npt.NDArray[np.integer]) -> str:
        """Token ids -> text; special ids are skipped, bytes that are no valid UTF-8 become U+FFFD."""
    def decode_piece(self, id: int) -> bytes:
        """The raw bytes of one token (b'' for special ids)."""

class GenerateStream(Iterator[Any]):
    """Iterator over generated text pieces (Model.generate(stream=True)): str for one prompt, (prompt index, str) for a list."""

    def __next__(self) -> Any: ...
    def close(self) -> None:
        """Stops generation (also when the iterator is dropped)."""

class Model:
    """A checkpoint's model (dlcm.load). Calls release the GIL while they compute; calls from several threads on one model run one after the other. Use as a context manager, or close(), to free it early."""

    @property
    def path(self) -> str:
        """The checkpoint folder."""
    @property
    def config(self) -> dict[str, Any]:
        """The model's config, as `dlcm config` prints it (a new dict each time)."""
    @property
    def arch(self) -> Literal["baseline", "dlcm"]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None:
        """Frees the model; later calls raise dlcm.ClosedError (state_dict views stay valid)."""
    def __enter__(self) -> Model: ...
    def __exit__(self, *args: object) -> None: ...
    def forward(self, tokens: Tokens, out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
        """Logits float32 [B, L, V] of token ids [B, L] ([L, V] for one row [L]), row by row as `dlcm forward` computes them (bit-identical). DLCM: boundaries thresholded at router.tau. out: a C-contiguous float32 array of that shape to write into (and return) instead of a new one."""
    def logits_at(self, tokens: Tokens, positions: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Logits float32 [n, V] at flat positions b * L + t of one forward pass over tokens [B, L] (the LM head runs on those rows only)."""
    def boundaries(self, tokens: Tokens, tau: float | None = None) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """DLCM: router probabilities p float32 [B, L] and boundaries b bool [B, L] (b = p >= tau, forced at row start and BOS; tau None: the checkpoint's router.tau)."""
    def concepts(self, text: str, tau: float | None = None) -> list[dict[str, Any]]:
        """DLCM: the text (after BOS) cut into concepts, one dict per concept: index, start and end (token positions, BOS is 0), text, p (of its first token), forced, ids, token_p."""
    def score(self, context: str | Sequence[int], continuation: str | Sequence[int]) -> tuple[float, bool]:
        """(log p(continuation | BOS + context), whether every continuation token is the argmax), as the zero-shot evaluation scores; text is split as its tasks split it."""
    def score_batch(self, pairs: Sequence[Pair], batch_tokens: int = 2048) -> list[tuple[float, bool]]:
        """score() of many (context, continuation) pairs, batched and with shared prefixes computed once."""
    @overload
    def generate(self, prompts: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None, stream: Literal[False] = False, tau: float | None = None, ignore_eos: bool = False, batch: int = 8, details: Literal[False] = False) -> str: ...
    @overload
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None, stream: Literal[False] = False, tau: float | None = None, ignore_eos: bool = False, batch: int = 8, details: Literal[False] = False) -> list[str]: ...
    @overload
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None, stream: Literal[True] = ..., tau: float | None = None, ignore_eos: bool = False, batch: int = 8, details: Literal[False] = False) -> GenerateStream: ...
    @overload
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None, stream: Literal[False] = False, tau: float | None = None, ignore_eos: bool = False, batch: int = 8, details: Literal[True] = ...) -> dict[str, Any] | list[dict[str, Any]]: ...
    def generate(self, prompts: Any, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Any = None, stream: bool = False, tau: float | None = None, ignore_eos: bool = False, batch: int = 8, details: bool = False) -> Any:
        """Continues a prompt (str -> str) or prompts (list -> list), as `dlcm generate` does: temperature 0 is greedy; prompt i samples from seed and i alone; the text ends before the first stop string or at EOS (unless ignore_eos). stream=True returns an iterator of text pieces as they are decoded; details=True returns dicts with text, ids, prompt_ids and stop_reason."""
    def state_dict(self) -> dict[str, npt.NDArray[np.float32]]:
        """Parameter name -> read-only float32 view of the model's weights (no copy; it sees later load_state_dict calls)."""
    def load_state_dict(self, state_dict: dict[str, npt.ArrayLike], strict: bool = True) -> None:
        """Copies float arrays into the parameters of the same names and shapes; strict: every parameter and no other key. Checks everything before changing anything."""
    def _time_forward(self, tokens: Tokens, repeats: int = 5) -> list[float]:
        """Seconds of each of `repeats` forward() computations timed inside C++ (the overhead benchmark's reference)."""

def load(path: PathLike) -> Model:
    """The model, tokenizer and config of a checkpoint folder or a run folder (its checkpoint/), baseline or DLCM."""

def prepare(inputs: PathLike | Sequence[PathLike], out: PathLike, tokenizer: Literal["bpe", "bytes"] = "bpe", vocab_size: int = 8192, val_fraction: float = 0.01, quiet: bool = True) -> dict[str, Any]:
    """`dlcm prepare`: tokenizes .txt/.jsonl files (or folders of them) into a data folder; returns its meta.json."""

def train(config: dict[str, Any] | PathLike | None, data: PathLike, out: PathLike, steps: int | None = None, overrides: dict[str, Any] | Sequence[str] | None = None, on_log: Callable[[dict[str, Any]], bool | None] | None = None, resume: bool = False, overwrite: bool = False, init_from: PathLike | None = None, quiet: bool = False, final_eval: bool = True, concept_usage: bool = False) -> dict[str, Any]:
    """`dlcm train` in this process: config as a dict or a JSON file, overrides as {key: value} or ["key=value"]. on_log gets each train_log.jsonl record as a dict; returning False stops the run. A stop, an exception in on_log, or Ctrl-C ends the run after the current step with a checkpoint (the exception is then raised). Returns step, checkpoint, stopped and, after a full run with final_eval, val_loss, val_ppl, val_bpb, val_tokens (val_compression for DLCM)."""

def eval(checkpoint: PathLike, data: PathLike | None = None, tasks: str | Sequence[str] | None = None, limit: int = -1, batch_size: int = 8, seq_len: int = 0, bench_dir: PathLike | None = None, task_file: PathLike | None = None, batch_tokens: int = 2048, concept_usage: bool = False, usage_batches: int = -1, quiet: bool = True) -> dict[str, Any]:
    """`dlcm eval`: validation loss, perplexity and bits per byte on data's validation split and/or zero-shot tasks; returns the report as a dict."""

def resolve_config(config: dict[str, Any] | PathLike | None = None, overrides: dict[str, Any] | Sequence[str] | None = None) -> dict[str, Any]:
    """`dlcm config`: the resolved, validated config (defaults filled in); errors name the key."""
