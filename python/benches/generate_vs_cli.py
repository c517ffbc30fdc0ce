"""Decode throughput of `ggpt.Model.generate` beside `ggpt run`'s own "eval time" line, on
one GGUF file, back to back (alternating, so that load on the machine hits both alike).

    python3 python/benches/generate_vs_cli.py MODEL.gguf [--ggpt target/release/ggpt] [-n 128] [--reps 5]

Python's decode time is t(generate n+1 tokens) - t(generate 1 token): the prompt's prefill
and the first sampled token cancel out, leaving n decode steps with their sampling, which is
what the CLI's eval time counts. Greedy, `<|endoftext|>` ignored, so both run exactly n steps.
"""

import argparse
import re
import statistics
import subprocess
import time

import ggpt

EVAL = re.compile(r"ggpt:\s+eval time =\s+([\d.]+) ms /\s+(\d+) tokens")


def cli_tps(ggpt_bin, model, prompt, n, threads):
    args = [ggpt_bin, "run", "-m", model, "-p", prompt, "-n", str(n + 1), "--temp", "0", "--ignore-eos"]
    if threads:
        args += ["-t", str(threads)]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    ms, tokens = EVAL.search(r.stderr).groups()
    # The CLI's eval time covers the decode steps after the first sampled token.
    return (int(tokens) - 1) / (float(ms) / 1e3)


def py_tps(m, prompt, n):
    kw = dict(temperature=0, ignore_eos=True)
    t = time.perf_counter()
    m.generate(prompt, max_new_tokens=1, **kw)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    m.generate(prompt, max_new_tokens=n + 1, **kw)
    tn = time.perf_counter() - t
    return n / (tn - t1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ggpt", default="target/release/ggpt")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-p", "--prompt", default="Hello, I'm a language model,")
    a = ap.parse_args()
    m = ggpt.Model(a.model, n_threads=a.threads)
    py_tps(m, a.prompt, 8)  # warm the page cache and the pools
    cli_tps(a.ggpt, a.model, a.prompt, 8, a.threads)
    cli, py = [], []
    for _ in range(a.reps):
        cli.append(cli_tps(a.ggpt, a.model, a.prompt, a.n, a.threads))
        py.append(py_tps(m, a.prompt, a.n))
    print(f"model {a.model}, {m.n_threads} threads, tg{a.n}, {a.reps} alternating runs")
    print("ggpt run   t/s: " + " ".join(f"{x:.2f}" for x in cli) + f"  median {statistics.median(cli):.2f}")
    print("generate() t/s: " + " ".join(f"{x:.2f}" for x in py) + f"  median {statistics.median(py):.2f}")
    print(f"ratio generate/run (medians): {statistics.median(py) / statistics.median(cli):.3f}")


if __name__ == "__main__":
    main()
