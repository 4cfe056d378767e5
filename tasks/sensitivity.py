"""sensitivity: what each module's quantization costs, for the budget search (tasks/search.py).

For one base model and a calibration text (never the fidelity corpus: the found recipe is
judged on text it was not chosen on), the cost of a module u in format f is the increase in
KL divergence from the base's next-token distribution, over the full vocabulary, when u
alone takes f and everything else stays in float. Measuring every (module, format) pair
would be ~200 modules x 21 formats forward passes; instead:

- measured: one probe format per module (3-bit affine, where its group fits), each a real
  forward pass with that module's weights quantized and dequantized in place. A pass
  starts at the module's layer, from the base's hidden states saved there (where the
  model's trunk takes `input_embeddings`, checked against a full pass; else whole);
- estimated: every other format from the module's output error on the calibration
  activations, tr(dW H dW^T) with H the Gram matrix of the module's inputs (the proxy
  GPTQ minimises), scaled by the module's own measured KL per unit of that error. Within
  a module, KL and output error are both quadratic in a small weight error, so the scale
  carries over between formats; across modules it does not, hence one probe each;
- checked: every `check_every`-th module is also measured in a second format (4-bit
  affine), and the artifact records how well the estimate ranks those (Spearman's rho)
  and their ratio. The found recipe's own KL is always measured, by its fidelity stage.

Embeddings have no input activations of the same kind; their proxy is the relative
weight error of the rows the calibration text uses (a tied output projection's share of
the effect is in the embedding's measured KL, whose pass quantizes both).
"""

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from tasks import cpu
from tasks.fidelity import windows
from tasks.loading import load_as, trunk_and_head
from tasks.plan import convert_dtype, model_config, model_modules
from tasks.recipes import layer_index
from tasks.specs import format_name, format_names, parse_format

# 2: the base's p computed once
# 3: every position from window/8 on scored, not the second half only
# 4: KL term by term again (2-3 computed it as sum p log p - sum p z + lse(z): float32 cancellation at the
#    1e-4 nats one module costs; the recipes found were worse: auto-5.5 KL 0.10 on Hamlet against 0.068)
CODE_VERSION = "4"
PROBE = {"bits": 3, "group_size": 64, "mode": "affine"}
CHECK = {"bits": 4, "group_size": 64, "mode": "affine"}


def all_formats() -> list[dict]:
    """Every format mlx quantizes to (tasks/specs.MODES); float is the search's extra option."""
    return [parse_format(n) for n in format_names() if n != "float"]


def fits(fmt: dict, in_features: int) -> bool:
    return in_features % fmt["group_size"] == 0


def qdq(w: mx.array, fmt: dict, dtype) -> mx.array:
    """The weight as the model computes with it after quantizing to `fmt` (from `dtype`, as convert casts first)."""
    packed = mx.quantize(w.astype(dtype), group_size=fmt["group_size"], bits=fmt["bits"], mode=fmt["mode"])
    biases = packed[2] if len(packed) > 2 else None
    return mx.dequantize(packed[0], scales=packed[1], biases=biases, group_size=fmt["group_size"],
                         bits=fmt["bits"], mode=fmt["mode"]).astype(w.dtype)


class _Recorder:
    """Stands in for a layer during the base pass, keeping the hidden state it was given."""

    def __init__(self, inner):
        self.inner, self.seen = inner, None

    def __getattr__(self, name):  # what the trunk asks of its layers (e.g. use_sliding)
        return getattr(self.inner, name)

    def __call__(self, x, *args, **kwargs):
        self.seen = x
        return self.inner(x, *args, **kwargs)


class Probe:
    """A base model on calibration windows, with one module's weights swapped at a time.

    The windows are split over the CPU's streams, one BLAS thread each, as the fidelity passes are
    (tasks/fidelity.py `_passes`): on 2 cores twice one stream's speed, and no oversubscription."""

    def __init__(self, model, tokens: np.ndarray, units: list[tuple[str, object]]):
        self.tokens, self.units = mx.array(tokens), dict(units)
        self.trunk, self.head = trunk_and_head(model)
        self.first = tokens.shape[1] // 8  # positions with at least window/8 tokens of context are scored
        self.layers = list(getattr(self.trunk, "layers", None) or [])
        streams = cpu.streams()
        self.parts = [(st, mx.array(p)) for st, p in zip(streams, np.array_split(np.arange(len(tokens)), len(streams)))
                      if len(p)]
        self.grams, self.entering, self.base_logp = self._base_pass(units)
        self.p = mx.exp(self.base_logp)  # once, not per pass
        self.scored = self.base_logp.shape[0] * self.base_logp.shape[1]
        mx.eval(self.p)
        self.resumes = self._resumes()

    def _base_pass(self, units):
        """The base once: its log-probs, the hidden state entering every layer, the Gram matrix of each linear's input."""
        grams, seen, by_id, patched = {}, {}, {id(m): p for p, m in units}, {}
        for _, module in units:  # mlx calls type(m).__call__: hook the classes for this one pass
            cls = type(module)
            if cls in patched or not hasattr(cls, "__call__"):
                continue
            original = patched[cls] = cls.__call__

            def hooked(self, x, *a, __original=original, **k):
                path = by_id.get(id(self))
                if path is not None and not path.endswith("embed_tokens"):
                    if id(x) not in seen:  # q/k/v (and gate/up) share their input: one Gram matrix for them
                        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
                        seen[id(x)] = (x, flat.T @ flat)
                    grams[path] = seen[id(x)][1]
                return __original(self, x, *a, **k)
            cls.__call__ = hooked
        recorders = [_Recorder(layer) for layer in self.layers]
        if recorders:
            self.trunk.layers = recorders
        try:
            hidden = self.trunk(self.tokens)
            head_in = hidden[:, self.first:-1]
            logp = self._logp(hidden)
            flat = head_in.reshape(-1, head_in.shape[-1]).astype(mx.float32)
            grams["<head>"] = flat.T @ flat
            entering = [r.seen for r in recorders]
            mx.eval(logp, list(grams.values()), entering)
        finally:
            for cls, original in patched.items():
                cls.__call__ = original
            if recorders:
                self.trunk.layers = self.layers
        return grams, entering, logp

    def _trunk_from(self, layer: int, rows: mx.array) -> mx.array:
        if layer == 0 or not self.resumes:
            return self.trunk(self.tokens[rows])
        self.trunk.layers = self.layers[layer:]
        try:
            return self.trunk(self.tokens[rows], input_embeddings=self.entering[layer][rows])
        finally:
            self.trunk.layers = self.layers

    def _resumes(self) -> bool:
        """Whether the trunk can start at a layer from the saved hidden state and give the full pass's result."""
        if len(self.layers) < 2:
            return False
        mid, rows = len(self.layers) // 2, mx.array([0])
        try:
            self.trunk.layers = self.layers[mid:]
            resumed = self.trunk(self.tokens[rows], input_embeddings=self.entering[mid][rows])
        except Exception:
            return False
        finally:
            self.trunk.layers = self.layers
        return bool(mx.allclose(resumed, self.trunk(self.tokens[rows]), rtol=1e-4, atol=1e-4).item())

    def _logp(self, hidden: mx.array) -> mx.array:
        logits = self.head(hidden[:, self.first:-1]).astype(mx.float32)
        return logits - cpu.logsumexp(logits)[..., None]

    def kl(self, path: str, fmt: dict, dtype) -> float:
        """Mean KL (nats per scored token, full vocabulary) from the base with `path` alone in `fmt`."""
        module = self.units[path]
        original = module.weight
        module.weight = qdq(original, fmt, dtype)
        layer = layer_index(path)
        sums = []
        try:
            mx.eval(module.weight)
            with cpu.blas_threads(1 if len(self.parts) > 1 else None):
                for stream, rows in self.parts:
                    with mx.stream(stream):
                        # sum p (log p - log q) term by term: the shortcut sum p log p - sum p z + lse(z) subtracts
                        # numbers near 20 to get ~1e-4 and chose worse recipes (CODE_VERSION 3, bench/search.py)
                        logp = self._logp(self._trunk_from(0 if layer is None else layer, rows))
                        sums.append((self.p[rows] * (self.base_logp[rows] - logp)).sum())
                mx.eval(sums)
        finally:
            module.weight = original
        return float(sum(s.item() for s in sums)) / self.scored

    def proxy(self, path: str, fmt: dict, dtype) -> float:
        """The output error of `path` in `fmt` on the calibration activations (embeddings: see the module doc)."""
        w = self.units[path].weight
        if path.endswith("embed_tokens"):  # the relative error of the rows the text uses (groups lie along rows)
            w = w[mx.array(np.unique(np.array(self.tokens)))].astype(mx.float32)
            return float((((qdq(w, fmt, dtype) - w) ** 2).sum() / (w ** 2).sum()).item())
        dw = (qdq(w, fmt, dtype) - w).astype(mx.float32)
        h = self.grams[path] if path in self.grams else self.grams["<head>"]  # lm_head runs outside the trunk
        return float(((dw @ h) * dw).sum().item())


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def measure(base_dir: Path, params: dict, out: Path, progress=None) -> dict:
    """The sensitivity table of the base at `base_dir` (params: SearchSpec's measuring fields, resolved)."""
    started = time.time()
    model, tokenizer = load_as(Path(base_dir), params["backend"])
    config = model_config(base_dir)
    dtype = getattr(mx, convert_dtype(config) or "float16")
    modules, n_layers, _, facts = model_modules(base_dir)
    found = dict(model.named_modules())  # by the paths a recipe names, before fast_swiglu wraps the MLPs
    units = [(p, found[p]) for p, _, _, _ in modules]
    cpu.fast_swiglu(model)
    shapes = {p: (o, i) for p, o, i, _ in modules}
    tokens = windows(tokenizer, {"corpus": params["calibration"], "window": params["window"],
                                 "windows": params["windows"]})
    probe = Probe(model, tokens, units)
    formats = [f for f in params["formats"] if f is not None]
    rows, checks = [], []
    for n, (path, _) in enumerate(units):
        in_features = shapes[path][1]
        options = [f for f in formats if fits(f, in_features)]
        probe_fmt = next((f for f in (PROBE, {**PROBE, "group_size": 32}) if fits(f, in_features)), None)
        if probe_fmt is None or not options:
            continue
        measured = probe.kl(path, probe_fmt, dtype)
        errors = {format_name(f): probe.proxy(path, f, dtype) for f in options}
        scale = max(measured, 0.0) / max(errors[format_name(probe_fmt)], 1e-30)
        check = None
        if params["check_every"] and n % params["check_every"] == 0 and fits(CHECK, in_features):
            check = probe.kl(path, CHECK, dtype)
            checks.append((scale * errors[format_name(CHECK)], check))
        for f in options:
            rows.append({"path": path, "layer": layer_index(path), "out_features": shapes[path][0],
                         "in_features": in_features, "format": format_name(f), **f, "proxy_error": errors[format_name(f)],
                         "predicted_kl": scale * errors[format_name(f)],
                         "measured_kl": measured if f == probe_fmt else (check if f == CHECK and check is not None else None)})
        if progress:
            progress(n + 1, len(units))
        if (n + 1) % max(1, len(units) // 10) == 0:  # stderr: the run's log (or the console with -v)
            spent = time.time() - started
            print(f"sensitivity: {n + 1}/{len(units)} modules measured, {spent:.0f} s, "
                  f"~{spent / (n + 1) * (len(units) - n - 1):.0f} s left", file=sys.stderr, flush=True)
    predicted, measured = [p for p, _ in checks], [m for _, m in checks]
    summary = {
        "units": len({r["path"] for r in rows}), "formats": len(formats), "forward_passes": len(units) + len(checks) + 1,
        "resumed_from_layer": probe.resumes, "scored_tokens": probe.scored,
        "check": {"format": format_name(CHECK), "modules": len(checks), "spearman": spearman(predicted, measured),
                  "median_ratio": float(np.median(np.array(predicted) / np.maximum(measured, 1e-12))) if checks else None},
        "seconds": round(time.time() - started, 1), "n_layers": n_layers, "dtype": facts["dtype"], "tied": facts["tied"],
    }
    (out / "sensitivity.json").write_text(json.dumps({"params": params, "summary": summary, "rows": rows}) + "\n")
    return {"summary": summary, "sensitivity": rows}


def load_table(artifact: Path) -> dict:
    return json.loads((Path(artifact) / "sensitivity.json").read_text())


def build(job) -> dict:
    """The sensitivity stage (tasks/registry.py); inputs: [the base as downloaded]."""
    return measure(job.inputs[0], job.params, job.out)
