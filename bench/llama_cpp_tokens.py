"""Write the token ids llama.cpp's own tokenizer gives for pieces of qsweep's shipped texts, for a GGUF.

The slow test tests/test_gguf.py::test_gemma3_270m_gguf_runs checks that the tokenizer tasks/gguf.py rebuilds
from the GGUF's metadata gives the same ids. llama.cpp is not a dependency of qsweep, so its answers are kept
in tests/data/ with the command that made them; run this again with a llama.cpp build to refresh them:

    .venv/bin/python bench/llama_cpp_tokens.py --llama-tokenize /path/to/llama-tokenize \
        --gguf .venv/share/qsweep/gemma-3-270m-q4_k_m.gguf --out tests/data/gemma3_270m_llama_cpp_ids.json

(built here from the llama-cpp-python 0.3.36 sdist's vendored llama.cpp, CPU, with cmake: its
build/bin/llama-tokenize.) Each text goes through `llama-tokenize --stdin --ids`, BOS as the vocabulary says.
"""

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tasks" / "data"
CHARS = 400
# What the shipped texts have little of: runs of spaces, tabs, digits, non-ASCII letters, CJK, an emoji.
EXTRA = ["  indented:\n\tx = 1_000_000;  y = 3.14159\n\n\n  end  ",
         "naïve café — Ωmega, Zürich, 日本語のテキスト, 🙂👍🏽, “quotes” and ‘apostrophes’ … 1990s–2020s",
         "Don't stop: it's 12:30pm, 45% of $1,234.56 is $555.55!"]


def pieces() -> list[dict]:
    out = []
    for path in sorted(DATA.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        for start in (0, len(text) // 2):
            out.append({"source": f"tasks/data/{path.name}[{start}:{start + CHARS}]", "text": text[start:start + CHARS]})
    out += [{"source": "written for this check", "text": t} for t in EXTRA]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-tokenize", required=True, help="llama.cpp's llama-tokenize binary")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    exe = Path(args.llama_tokenize).resolve()
    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parent))
    version = subprocess.run([exe, "--version"], env=env, capture_output=True, text=True).stderr.strip().splitlines()
    digest = hashlib.sha256(Path(args.gguf).read_bytes()).hexdigest()
    rows = []
    for piece in pieces():
        done = subprocess.run([exe, "-m", args.gguf, "--stdin", "--ids", "--log-disable"], input=piece["text"],
                              env=env, capture_output=True, text=True, check=True)
        rows.append(dict(piece, ids=json.loads(done.stdout.strip().splitlines()[-1])))
    head = {"made_by": "bench/llama_cpp_tokens.py: llama-tokenize --stdin --ids (BOS as the vocabulary says)",
            "llama_cpp": version, "gguf": Path(args.gguf).name, "gguf_sha256": digest}
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines += [' "pieces": [', ",\n".join(f"  {json.dumps(r, ensure_ascii=False)}" for r in rows), " ]"]
    Path(args.out).write_text("{\n" + "\n".join(lines) + "\n}\n", encoding="utf-8")  # a piece a line
    print(f"{len(rows)} pieces, {sum(len(r['ids']) for r in rows)} ids -> {args.out}")


if __name__ == "__main__":
    main()
