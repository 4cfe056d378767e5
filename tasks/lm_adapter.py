"""MLXLM: an mlx-lm model as lm-eval's LM, thin on purpose.

It subclasses lm-eval's TemplateLM so that context/continuation tokenisation (trailing-space
handling, the empty-context prefix token) is lm-eval's own code, exactly as HFLM does it.
Scoring is tasks/scoring.py's, through tasks/checkpoint.py when a checkpoint file is given.
"""

from pathlib import Path

from lm_eval.api.model import TemplateLM

from tasks import checkpoint as checkpointing
from tasks import cpu
from tasks.loading import context_length, load_as
from tasks.scoring import Scorer


class MLXLM(TemplateLM):
    backend = "causal"

    def __init__(self, model_dir: Path, batch_size: int = 16, max_length: int | None = None, backend: str = "native",
                 checkpoint: Path | None = None):
        super().__init__()
        self.checkpoint = Path(checkpoint) if checkpoint else None  # scored requests so far (tasks/checkpoint.py)
        self.model_dir = Path(model_dir)
        self.model, self.tokenizer = load_as(self.model_dir, backend)
        cpu.fast_swiglu(self.model)
        self.weights = backend  # not `self.backend`: lm-eval reads that as "causal" or "seq2seq"
        self.batch_size = batch_size
        self._max_length = max_length or context_length(self.model_dir)
        self.scorer = Scorer(self.model, batch_size, self._max_length, self.prefix_token_id)
        # (string, add_special_tokens) -> tokens. The benchmark hands in one memo shared by every model
        # with this tokenizer (tasks/benchmark.py Prepared): a recipe re-encodes nothing another encoded.
        self.encoded: dict = {}

    # ---- tokenisation, as lm-eval's HFLM does it
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        tokens = self.encoded.get((string, add_special_tokens))
        if tokens is None:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            # A chat-templated prompt already starts with BOS; do not add a second one.
            if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
                kw["add_special_tokens"] = False
            tokens = self.encoded[(string, add_special_tokens)] = self.tokenizer.encode(string, **kw)
        return list(tokens)  # a copy: the memo's lists must not change under it

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # ---- scoring
    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context_tokens, continuation_tokens)]."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        if self.checkpoint is None:
            return self.scorer.score(pairs)
        return checkpointing.scored(self.checkpoint, pairs, self.scorer.score)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            # The prefix token conditions the first window, so no BOS from the tokenizer.
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((text, ""), ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mlx_lm import stream_generate

        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(gen_kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_gen):]
            text = ""
            # The default sampler is argmax: greedy whatever the task asks. EOS stops it too.
            for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_gen):
                text += response.text
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u, 1)[0]
            outputs.append(text)
        return outputs
