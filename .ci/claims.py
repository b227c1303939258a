"""The paper's claims in miniature: r0.py's ablations on the --tiny toy, 3 seeds each, a table and a figure.

    python .ci/claims.py                 # every run (about 25 minutes on 2 CPU cores), then the table and the figure
    python .ci/claims.py --report-only   # the table and the figure from the runs already in runs/claims

Each variant is the tiny demo with one switch changed (README: "The paper's claims in miniature"), trained for
STEPS steps (half the demo's 400, so that the set fits half an hour) with a progress grid, and so the held-out
measures, every 25 steps. A finished run (its summary.json holds the 'after' measures) is not run again.
Writes the markdown table to stdout and the figure to assets/claims.png (each variant's mean over seeds, and the
band from the lowest to the highest seed)."""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SEEDS, OUT = 200, (0, 1, 2), os.path.join(HERE, "runs", "claims")
COLOUR_ONLY, TWO_REWARDS = ["--rewards", "color=1.0"], ["--rewards", "color=1.0,bright=0.1"]
# our choices: STEPS (half the demo's), and bright's weight 0.1 beside color's 1.0, set before any run (a secondary
# preference that the weights say must not take over; the claims were not tuned toward).
# (the claim, the paper's figure, [(variant, flags)]): the variant the paper favours first
CLAIMS = [
    ("normalized reward gradients beat raw ones", "Fig. 8",
     [("normalized", TWO_REWARDS), ("raw", [*TWO_REWARDS, "--no-normalize"])]),
    ("the weight anchor stops reward hacking", "Fig. 11",
     [("anchor (lambda 1e-2)", COLOUR_ONLY), ("no anchor", [*COLOUR_ONLY, "--weight-reg", "0"])]),
    ("random eta is a regularizer", "section 3.3",
     [("random eta", COLOUR_ONLY), ("eta = 0", [*COLOUR_ONLY, "--no-random-eta"])]),
    ("R0+ converges faster than R0", "Fig. 12", [("R0+", [*COLOUR_ONLY, "--r0-plus"]), ("R0", COLOUR_ONLY)]),
]
# the figure's panels: (claim, x, y). The anchor's claim is read on detail (what hacking the colour reward destroys),
# R0+'s against steps and against training seconds, the others on held-out colour accuracy.
PANELS = [(0, "step", "colour_accuracy"), (1, "step", "detail_kept"), (2, "step", "colour_accuracy"),
          (3, "step", "colour_accuracy"), (3, "seconds", "colour_accuracy")]


def folder(flags, seed):
    """One run folder per distinct command (variants that share flags, as the colour-only baseline, share runs)."""
    name = "_".join(f.strip("-").replace("=", "").replace(",", "+").replace(".", "") for f in flags) or "default"
    return os.path.join(OUT, f"{name}_seed{seed}")


def run(flags, seed):
    out = folder(flags, seed)
    if "detail" in load(out)[1]:
        return
    cmd = [sys.executable, os.path.join(HERE, "r0.py"), "--tiny", "--prompts", os.path.join(HERE, "prompts.txt"),
           "--output-dir", out, "--overwrite", "--device", "cpu", "--seed", str(seed), "--max-steps", str(STEPS),
           "--sample-every", "25",
           "--checkpoint-every", str(STEPS), *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        sys.exit(f"this run failed ({done.returncode}):\n{done.stderr[-2000:]}")


def load(out):
    """(log lines, summary) of a run folder ([] and {} if it has not finished)."""
    if not os.path.isfile(os.path.join(out, "summary.json")):
        return [], {}
    return ([json.loads(line) for line in open(os.path.join(out, "log.jsonl"))],
            json.load(open(os.path.join(out, "summary.json"))))


def mean_std(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def report():
    """The markdown table (mean ± standard deviation over the seeds) and assets/claims.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    print("| claim (paper) | variant | colour accuracy % | detail kept % | colour reward | bright | s/step |\n"
          "|---|---|---|---|---|---|---|")
    runs = {flags_key(flags): [r for r in (load(folder(flags, seed)) for seed in SEEDS) if r[1]]
            for _, _, variants in CLAIMS for _, flags in variants}
    for claim, where, variants in CLAIMS:
        for v, (variant, flags) in enumerate(variants):
            done = runs[flags_key(flags)]
            if not done:
                continue
            last = [log[-1] for log, _ in done]
            cells = [mean_std([100 * s["colour_accuracy"] for _, s in done]),
                     mean_std([100 * s["detail_kept"] for _, s in done]), mean_std([r["color"] for r in last]),
                     mean_std([r["bright"] for r in last]) if "bright" in last[0] else "",
                     mean_std([statistics.mean(r["seconds"] for r in log) for log, _ in done])]
            print(f"| {f'{claim} ({where})' if v == 0 else ''} | {variant} | " + " | ".join(cells) + " |")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.4 * len(PANELS), 3.0))
    for ax, (c, x, y) in zip(axes, PANELS):
        _, where, variants = CLAIMS[c]
        for variant, flags in variants:
            curves = []  # per seed: the base model's measure at step 0, then each progress grid's
            for log, summary in runs[flags_key(flags)]:
                points, elapsed = [(0, 1.0 if y == "detail_kept" else summary[f"{y}_before"])], 0.0
                for r in log:
                    elapsed += r["seconds"]
                    if y in r:
                        points.append((r["step"] if x == "step" else elapsed, r[y]))
                curves.append(points)
            if not curves:
                continue
            xs = [statistics.mean(c_[i][0] for c_ in curves) for i in range(len(curves[0]))]
            ys = [[c_[i][1] for c_ in curves] for i in range(len(curves[0]))]
            line, = ax.plot(xs, [statistics.mean(v_) for v_ in ys], label=variant, lw=1.5)
            ax.fill_between(xs, [min(v_) for v_ in ys], [max(v_) for v_ in ys], alpha=0.2, color=line.get_color())
        ax.set_title(f"{where}: {y.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("training seconds" if x == "seconds" else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(HERE, "assets", "claims.png")
    fig.savefig(path, dpi=80)
    print(f"\nfigure: {os.path.relpath(path, HERE)} (mean over seeds {SEEDS}, band: lowest to highest seed)")


def flags_key(flags):
    return " ".join(flags)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report-only", action="store_true", help="no new runs: the table and figure of those done")
    args = p.parse_args()
    if not args.report_only:
        for _, _, variants in CLAIMS:
            for _, flags in variants:
                for seed in SEEDS:
                    run(flags, seed)
    report()


if __name__ == "__main__":
    main()
