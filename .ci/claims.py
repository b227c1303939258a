"""The paper's claims in miniature: r0.py's switches on the --tiny toy, registered here before the first run.

    python .ci/claims.py --measure-scales   # step 1: the gradient scales that the rescaled raw variant uses (SCALES)
    python .ci/claims.py                    # every run (two at a time, one thread each), then claims.json and the figure
    python .ci/claims.py --report-only      # claims.json, the README table and assets/claims.png from the runs done

THE DESIGN (fixed before any of these runs; the verdicts are whatever the numbers give)

Every run is the toy demo, `python r0.py --tiny --prompts prompts.txt --device cpu --seed S` (LoRA rank 8, lr 1e-2,
batch 16, lambda 1e-2, random eta, per-sample normalization, K = 4), with one switch changed; OMP_NUM_THREADS=1
(the tiny models' pretraining depends on the thread count: every run builds the same ones); seeds S = 0..4 (the seed
also draws the tiny base model). Its held-out measures (r0.toy_measures, every 100 steps; claim 5: every 50) are of
the generator's final output at seeds 1000-1003: `colour_accuracy`, the true score (the mean colour's nearest palette
word is the prompt's), on the training prompts and on the fifth held out of training (`_unseen`); `content_kept`
(correlation with the base model's image of the same prompt and seed); each training reward's mean.

The hackable reward, `proxy` (r0.fit_proxy): a two-layer CNN colour classifier fitted once (600 Adam steps) on 33
images, 3 per palette colour, each a random toy texture shifted to that colour: few images, from another distribution
than the generator's, as human judgements are for HPS. r = log p(prompt's colour). `proxy_b`: the same recipe on
other textures and another initialization. The exact mean-colour rule (`color`) is the true score they never see.

Claims, variants and endpoints (a `claim` variant first, its comparison variant second):
 1. Fig. 11, the weight anchor stops reward hacking. `--rewards proxy`, 800 steps (the notes' probe saw a 33-image
    proxy over-optimized near step 700 at lambda 0). LoRA at lambda 0, 1e-3, 1e-2 (the default), 1e-1; full
    fine-tuning (`--lora-rank 0 --lr 1e-3`: our choice, 10x below LoRA's rate as for SD1.5) at lambda 0 and 1e-2.
    Endpoints at step 800: accuracy and content_kept, lambda 1e-2 minus lambda 0 (LoRA; full), claimed > 0. And
    over-optimization without the anchor: accuracy at 800 minus at 400, lambda 0 (LoRA; full), claimed < 0.
 2. Figs. 9 / 10, rewards check each other. `--rewards proxy` (claim 1's lambda 1e-2 run at step 400), `proxy_b`,
    `proxy=1.0,proxy_b=1.0`, 400 steps. Accuracy and content_kept at 400: both minus each alone, claimed > 0.
 3. Fig. 8, normalized reward gradients beat raw ones. `--rewards color=1.0,bright=0.1` (bright: mean luma on 0-255,
    a louder second reward), 200 steps: `--normalize sample` (the default), `none` (raw), `none` with the weights
    divided by each reward's mean per-sample gradient norm on the base model (SCALES: the same pull as normalized at
    the start, so the difference is what per-sample normalization does beyond one fixed rescaling), `batch`. Accuracy
    and content_kept at 200: sample minus each other variant, claimed > 0.
 4. A third-party summary: random eta is a regularizer. `--rewards proxy`, 400 steps: random eta (claim 1's lambda 1e-2 run)
    against `--no-random-eta`, each generator evaluated at eta 0, 0.5 and 1. Endpoints: accuracy averaged over the
    three etas, random minus zero, claimed > 0; the proxy's gap at eta 0 (its own accuracy minus the true one),
    zero minus random, claimed > 0.
 5. Fig. 12, R0+ converges faster. `--rewards color`: R0 200 steps, R0+ (`--r0-plus`) 400 steps (a step costs about
    half), measures every 50 steps. Endpoint: accuracy at equal training seconds T (R0's own total; R0+ interpolated
    linearly between its measures), R0+ minus R0, claimed > 0. Also reported: the gradient norm per sampled step k.
Verdict of a comparison: the per-seed paired differences d_S; their mean and 95% interval, mean +- t(0.975, 4)
sd / sqrt(5) (t = 2.776); reproduced if the interval excludes 0 in the claimed direction, contradicted if it excludes
0 in the other, inconclusive otherwise.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT, SEEDS, T_975 = os.path.join(HERE, "runs", "claims"), range(5), 2.776
COST = os.path.join(OUT, "cost.json")  # seconds of each run and evaluation, written as each finishes
# measured by `python .ci/claims.py --measure-scales` before any run (seed 0's base model, 4 micro-batches of 16):
# the mean per-sample norm of each reward's pixel gradient; the rescaled raw variant divides the weights by them
SCALES = {"color": 0.018605800738441758, "bright": 2.6637775897979736}
CLAIM_3_RESCALED = "color=53.7467,bright=0.0375407"  # 1.0 / 0.0186 and 0.1 / 2.66

VARIANTS = {  # name -> (r0.py flags, steps, measure every)
    "anchor 0": (["--rewards", "proxy", "--weight-reg", "0"], 800, 100),
    "anchor 1e-3": (["--rewards", "proxy", "--weight-reg", "1e-3"], 800, 100),
    "anchor 1e-2": (["--rewards", "proxy"], 800, 100),
    "anchor 1e-1": (["--rewards", "proxy", "--weight-reg", "1e-1"], 800, 100),
    "full 0": (["--rewards", "proxy", "--lora-rank", "0", "--lr", "1e-3", "--weight-reg", "0"], 800, 100),
    "full 1e-2": (["--rewards", "proxy", "--lora-rank", "0", "--lr", "1e-3"], 800, 100),
    "proxy_b": (["--rewards", "proxy_b"], 400, 100),
    "both proxies": (["--rewards", "proxy=1.0,proxy_b=1.0"], 400, 100),
    "eta 0": (["--rewards", "proxy", "--no-random-eta"], 400, 100),
    "normalized": (["--rewards", "color=1.0,bright=0.1"], 200, 100),
    "raw": (["--rewards", "color=1.0,bright=0.1", "--normalize", "none"], 200, 100),
    "raw rescaled": (["--rewards", CLAIM_3_RESCALED, "--normalize", "none"], 200, 100),
    "per batch": (["--rewards", "color=1.0,bright=0.1", "--normalize", "batch"], 200, 100),
    "R0": (["--rewards", "color"], 200, 50),
    "R0+": (["--rewards", "color", "--r0-plus"], 400, 50),
}
EVAL_ETAS = (0.0, 0.5, 1.0)  # claim 4: its two variants' generators at step 400, sampled at each
# (claim, paper, [(claim variant, comparison variant, endpoint, step, claimed sign)])
CLAIMS = [
    ("the weight anchor stops reward hacking", "Fig. 11", [
        ("anchor 1e-2", "anchor 0", "colour_accuracy", 800, 1), ("anchor 1e-2", "anchor 0", "content_kept", 800, 1),
        ("full 1e-2", "full 0", "colour_accuracy", 800, 1), ("full 1e-2", "full 0", "content_kept", 800, 1),
        ("anchor 0", "anchor 0", "colour_accuracy 800 - 400", 800, -1),
        ("full 0", "full 0", "colour_accuracy 800 - 400", 800, -1)]),
    ("rewards check each other", "Figs. 9, 10", [
        ("both proxies", "anchor 1e-2", "colour_accuracy", 400, 1), ("both proxies", "proxy_b", "colour_accuracy", 400, 1),
        ("both proxies", "anchor 1e-2", "content_kept", 400, 1), ("both proxies", "proxy_b", "content_kept", 400, 1)]),
    ("normalized reward gradients beat raw ones", "Fig. 8", [
        (a, b, e, 200, 1) for b in ("raw", "raw rescaled", "per batch") for a, e in
        (("normalized", "colour_accuracy"), ("normalized", "content_kept"))]),
    ("random eta is a regularizer", "third-party summary", [
        ("anchor 1e-2", "eta 0", "colour_accuracy over eta 0, 0.5, 1", 400, 1),
        ("eta 0", "anchor 1e-2", "proxy gap at eta 0", 400, 1)]),
    ("R0+ converges faster than R0", "Fig. 12", [("R0+", "R0", "colour_accuracy at R0's seconds", 200, 1)]),
]


def folder(variant, seed):
    return os.path.join(OUT, f"{variant.replace(' ', '_').replace('+', 'plus')}_seed{seed}")


def command(variant, seed):
    flags, steps, every = VARIANTS[variant]
    return ["r0.py", "--tiny", "--prompts", "prompts.txt", "--device", "cpu", "--seed", str(seed), *flags,
            "--max-steps", str(steps), "--sample-every", str(every), "--checkpoint-every", "400",
            "--output-dir", os.path.relpath(folder(variant, seed), HERE), "--overwrite"]


def load(variant, seed):
    """(log records, summary, eta evaluation) of a finished run, or None."""
    d = folder(variant, seed)
    if not os.path.isfile(os.path.join(d, "summary.json")) or "after" not in json.load(open(os.path.join(d, "summary.json"))):
        return None
    log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    evals = json.load(open(os.path.join(d, "eta_eval.json"))) if os.path.isfile(os.path.join(d, "eta_eval.json")) else {}
    return log, json.load(open(os.path.join(d, "summary.json"))), evals


def one_thread_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train(variant, seed):
    if load(variant, seed):
        return 0.0
    t0 = time.time()
    done = subprocess.run([sys.executable, *command(variant, seed)], cwd=HERE, capture_output=True, text=True,
                          env=one_thread_env())
    if done.returncode:
        raise RuntimeError(f"{variant} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"{variant} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return time.time() - t0


def evaluate(variant, seed, step=400):
    """Claim 4: the generator of `step` sampled at each of EVAL_ETAS (r0.toy_measures), into eta_eval.json."""
    path = os.path.join(folder(variant, seed), "eta_eval.json")
    if os.path.isfile(path):
        return 0.0
    t0 = time.time()
    done = subprocess.run([sys.executable, __file__, "--evaluate", variant, str(seed), str(step)], cwd=HERE,
                          capture_output=True, text=True, env=one_thread_env())
    if done.returncode:
        raise RuntimeError(f"evaluating {variant} seed {seed} failed:\n{done.stderr[-3000:]}")
    print(f"{variant} seed {seed}, eta evaluation: {time.time() - t0:.0f} s", flush=True)
    return time.time() - t0


def evaluate_here(variant, seed, step):
    sys.path.insert(0, HERE)
    import torch
    import r0
    d = folder(variant, seed)
    cfg = r0.resolve_config(r0.build_parser().parse_args(["--resume", d]))
    m = r0.load_models(cfg)
    trained = r0.load_tensors(os.path.join(d, "checkpoints", f"step_{step:06d}.pt"), "checkpoint")["trainable"]
    params = dict(m.unet.named_parameters())
    for name, value in trained.items():
        params[name].data.copy_(value)
    prompts = r0.load_prompts(cfg.prompts)
    unseen = list(r0.held_out_prompts(prompts))
    seen = [p for p in prompts if r0.colour_of(p) and p not in unseen]
    with torch.no_grad(), r0.theta_0(m.unet, m.frozen_unet) as base:
        base_images = r0.held_out_images(dataclasses.replace(m, unet=base), cfg, seen + unseen)
    out = {str(eta): r0.toy_measures(m, cfg, seen, unseen, base_images, eta) for eta in EVAL_ETAS}
    logged = next(r["measures"] for r in map(json.loads, open(os.path.join(d, "log.jsonl"))) if r["step"] == step)
    assert out["0.0"] == logged, "the evaluation at eta 0 differs from the run's own measures: another machine?"
    json.dump(out, open(os.path.join(d, "eta_eval.json"), "w"), indent=1)


def measure_scales():
    """The mean per-sample norm of color's and bright's pixel gradients on seed 0's base model: 4 micro-batches of 16
    training prompts, random eta, exactly as the first steps of claim 3's runs draw them."""
    sys.path.insert(0, HERE)
    import torch
    import r0
    cfg = r0.resolve_config(r0.build_parser().parse_args(command("normalized", 0)[1:]))
    m = r0.load_models(cfg)
    prompts = r0.load_prompts(cfg.prompts)
    order = r0.PromptOrder([p for p in prompts if p not in set(r0.held_out_prompts(prompts))], 0)
    generator, norms = torch.Generator().manual_seed(0), {name: [] for name in m.rewards}
    with torch.no_grad():
        for _ in range(4):
            batch = order.batch(16)
            emb = r0.encode_prompts(m.tokenizer, m.text_encoder, batch)
            noise = torch.randn((16, 4, 8, 8), generator=generator)
            pixels = r0.decode(m.vae, r0.generate(m.unet, noise, emb, 4, m.alphas_cumprod, random_eta=True,
                                                  generator=generator))
            for name, reward in m.rewards.items():
                norms[name] += r0.reward_gradient(reward, pixels, batch, emb)[1].flatten(1).norm(dim=1).tolist()
    scales = {name: statistics.mean(v) for name, v in norms.items()}
    print(json.dumps(scales), "->", ",".join(f"{n}={w / scales[n]:.6g}" for n, w in cfg.rewards.items()))


def per_seed(variant, endpoint, step):
    """The endpoint of each seed's run of variant (None where the run is missing)."""
    values = []
    for seed in SEEDS:
        run = load(variant, seed)
        if run is None:
            values.append(None)
            continue
        log, summary, evals = run
        at = {r["step"]: r["measures"] for r in log if "measures" in r}
        at[0] = summary["before"]
        if endpoint == "colour_accuracy 800 - 400":
            values.append(at[800]["colour_accuracy"] - at[400]["colour_accuracy"])
        elif endpoint == "colour_accuracy over eta 0, 0.5, 1":
            values.append(statistics.mean(evals[str(e)]["colour_accuracy"] for e in EVAL_ETAS) if evals else None)
        elif endpoint == "proxy gap at eta 0":
            values.append(at[step]["proxy_accuracy"] - at[step]["colour_accuracy"])
        elif endpoint == "colour_accuracy at R0's seconds":
            values.append(accuracy_at_seconds(log, summary, r0_seconds(seed)))
        else:
            values.append(at[step][endpoint])
    return values


def curve(log, summary, key):
    """[(step, cumulative training seconds, measure)] of one run, from the base model's at step 0."""
    points, seconds = [(0, 0.0, summary["before"][key])], 0.0
    for r in log:
        seconds += r["seconds"]
        if "measures" in r:
            points.append((r["step"], seconds, r["measures"][key]))
    return points


def r0_seconds(seed):
    run = load("R0", seed)
    return sum(r["seconds"] for r in run[0]) if run else math.nan


def accuracy_at_seconds(log, summary, t):
    points = curve(log, summary, "colour_accuracy")
    for (_, t0, a0), (_, t1, a1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return a0 + (a1 - a0) * (t - t0) / (t1 - t0)
    return math.nan


def verdict(diffs, sign):
    n = len(diffs)
    mean, half = statistics.mean(diffs), T_975 * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    word = ("reproduced" if (lo > 0 if sign > 0 else hi < 0) else
            "contradicted" if (hi < 0 if sign > 0 else lo > 0) else "inconclusive")
    return mean, (lo, hi), word


def report():
    """claims.json (every variant's command and per-seed numbers, each comparison's differences, interval, verdict),
    the README table on stdout, assets/claims.png."""
    result = {"design": __doc__.split("THE DESIGN")[1].strip(), "scales": SCALES, "claims": [], "pending": []}
    print("| claim (paper) | comparison | endpoint | mean difference [95% interval] | verdict |\n|---|---|---|---|---|")
    for claim, paper, comparisons in CLAIMS:
        entry = {"claim": claim, "paper": paper, "variants": {}, "comparisons": []}
        for a, b, endpoint, step, sign in comparisons:
            for v in (a, b):
                entry["variants"][v] = {"commands": [" ".join(command(v, s)) for s in SEEDS]}
            va, vb = per_seed(a, endpoint, step), per_seed(b, endpoint, step)
            if endpoint == "colour_accuracy 800 - 400":
                vb = [0.0] * len(va)
            if None in va or None in vb or any(map(math.isnan, va + vb)):  # runs not finished: no verdict yet
                done = sum(x is not None and y is not None for x, y in zip(va, vb))
                result["pending"].append(f"{claim} ({paper}): {a} - {b}, {endpoint} at {step} ({done} of 5 seeds run)")
                continue
            diffs = [x - y for x, y in zip(va, vb)]
            mean, (lo, hi), word = verdict(diffs, sign)
            entry["comparisons"].append({"a": a, "b": b, "endpoint": endpoint, "step": step, "claimed": ">0" if sign > 0
                                         else "<0", "a_per_seed": va, "b_per_seed": vb, "differences": diffs,
                                         "mean": mean, "interval": [lo, hi], "verdict": word})
            unit = 100  # accuracy and content_kept in percent (points)
            what = f"{a} - {b}" if a != b else a
            print(f"| {claim} ({paper}) | {what} | {endpoint} at {step} | {unit * mean:+.1f} [{unit * lo:+.1f}, "
                  f"{unit * hi:+.1f}] | {word} |")
        result["claims"].append(entry)
    result["grad_norm_per_k"] = grad_norm_per_k()
    per_run = json.load(open(COST)) if os.path.isfile(COST) else {}
    result["seconds"] = {}  # per variant: each run's (or evaluation's) wall-clock seconds
    for key, secs in per_run.items():
        result["seconds"].setdefault(key.rsplit(" seed ", 1)[0], []).append(secs)
    json.dump(result, open(os.path.join(HERE, ".ci", "claims.json"), "w"), indent=1)
    figure(result)
    markdown(result)


def markdown(result):
    """.ci/claims.md: the design as registered, every comparison's per-seed numbers, interval and verdict, costs."""
    lines = ["# The paper's claims in miniature: design and results", "",
             "Written by `python .ci/claims.py --report-only` from the runs of `python .ci/claims.py` "
             "(the numbers: [claims.json](claims.json)).", "", "## The design, as registered before the first run",
             "", "```", result["design"], "```", "", "## Results", "",
             "| claim (paper) | comparison | endpoint | per seed (0-4): a, b | mean difference [95% interval] | verdict |",
             "|---|---|---|---|---|---|"]
    for c in result["claims"]:
        for x in c["comparisons"]:
            seeds = "; ".join(f"{100 * a:.1f}, {100 * b:.1f}" for a, b in zip(x["a_per_seed"], x["b_per_seed"]))
            what = f"{x['a']} - {x['b']}" if x["a"] != x["b"] else x["a"]
            lines.append(f"| {c['claim']} ({c['paper']}) | {what} | {x['endpoint']} at {x['step']} | {seeds} | "
                         f"{100 * x['mean']:+.1f} [{100 * x['interval'][0]:+.1f}, {100 * x['interval'][1]:+.1f}] | "
                         f"{x['verdict']} |")
    if result["pending"]:
        lines += ["", "Not run yet, so without a verdict (`python .ci/claims.py` goes on where it stopped):", ""]
        lines += [f"- {p}" for p in result["pending"]]
    lines += ["", "Accuracy and content kept in percent (points for differences). The commands of every run are in "
              "claims.json (`variants`).", "", "## R0+: the gradient norm per sampled step k", "",
              "| k | steps | mean norm before clipping | share clipped (norm > 1) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['steps']} | {v['mean']:.3g} | {100 * v['clipped']:.0f}% |"
              for k, v in result["grad_norm_per_k"].items()]
    if result["seconds"]:
        typical = {k: statistics.median(v) * (5 if len(v) > 1 else 1) for k, v in result["seconds"].items()}
        lines += ["", "## What each variant cost", "", "Wall-clock seconds of each variant's 5 runs, two at a time, one "
                  "thread each, on the project's 2-core machine: 5 x the median run (a few runs shared the machine "
                  "with other jobs or were paused, and their own seconds, in claims.json, are longer). All together "
                  f"{sum(typical.values()) / 3600:.1f} hours of run time, about half that of wall-clock:", "",
                  ", ".join(f"{k}: {v:.0f}" for k, v in typical.items())]
    open(os.path.join(HERE, ".ci", "claims.md"), "w").write("\n".join(lines) + "\n")


def grad_norm_per_k():
    """Claim 5's R0+ runs: the gradient norm before clipping for each sampled step k, mean and share above the clip."""
    by_k = {}
    for seed in SEEDS:
        run = load("R0+", seed)
        for r in run[0] if run else []:
            by_k.setdefault(str(r["k"]), []).append(r["grad_norm"])
    return {k: {"mean": statistics.mean(v), "clipped": sum(g > 1.0 for g in v) / len(v), "steps": len(v)}
            for k, v in sorted(by_k.items())}


def mean_curve(variant, key, x="step"):
    runs = [r for r in (load(variant, s) for s in SEEDS) if r]
    if not runs:
        return [], []
    curves = [curve(log, summary, key) for log, summary, _ in runs]
    n = min(map(len, curves))
    xs = [statistics.mean(c[i][0 if x == "step" else 1] for c in curves) for i in range(n)]
    return xs, [100 * statistics.mean(c[i][2] for c in curves) for i in range(n)]


def figure(result):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    verdicts = {c["claim"]: {(x["a"], x["b"], x["endpoint"]): x["verdict"] for x in c["comparisons"]}
                for c in result["claims"]}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))

    def panel(ax, title, variants, key="colour_accuracy", x="step", ylabel="held-out colour accuracy %"):
        for v in variants:
            xs, ys = mean_curve(v, key, x)
            if xs:
                ax.plot(xs, ys, label=v, lw=1.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training seconds" if x == "seconds" else "step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)

    def said(claim, a, b, endpoint):
        return verdicts.get(claim, {}).get((a, b, endpoint), "not run")

    c1, c2, c3, c4, c5 = (c[0] for c in CLAIMS)
    panel(axes[0, 0], f"anchor, LoRA (Fig. 11): {said(c1, 'anchor 1e-2', 'anchor 0', 'colour_accuracy')}",
          ["anchor 0", "anchor 1e-3", "anchor 1e-2", "anchor 1e-1"])
    panel(axes[0, 1], "the proxy's own score on the same images", ["anchor 0", "anchor 1e-3", "anchor 1e-2",
                                                                    "anchor 1e-1"], key="proxy_accuracy",
          ylabel="proxy's colour accuracy %")
    gao(axes[0, 2])
    panel(axes[0, 3], f"anchor, full fine-tuning: {said(c1, 'full 1e-2', 'full 0', 'colour_accuracy')}",
          ["full 0", "full 1e-2"])
    panel(axes[1, 0], f"rewards check each other (Figs. 9, 10): {said(c2, 'both proxies', 'proxy_b', 'colour_accuracy')}",
          ["anchor 1e-2", "proxy_b", "both proxies"])
    panel(axes[1, 1], f"normalization (Fig. 8): vs raw {said(c3, 'normalized', 'raw', 'colour_accuracy')}",
          ["normalized", "raw", "raw rescaled", "per batch"])
    eta_panel(axes[1, 2], f"random eta (3.3): {said(c4, 'anchor 1e-2', 'eta 0', 'colour_accuracy over eta 0, 0.5, 1')}")
    panel(axes[1, 3], f"R0+ (Fig. 12): {said(c5, 'R0+', 'R0', 'colour_accuracy at R0' + chr(39) + 's seconds')}",
          ["R0", "R0+"], x="seconds")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "assets", "claims.png"), dpi=72)


def gao(ax):
    """Reward over-optimization, as Gao et al. plot it: true and proxy accuracy against sqrt(reg) (LoRA, every lambda)."""
    for v in ("anchor 0", "anchor 1e-3", "anchor 1e-2", "anchor 1e-1"):
        runs = [r for r in (load(v, s) for s in SEEDS) if r]
        if not runs:
            continue
        steps = [r["step"] for r in runs[0][0] if "measures" in r]
        xs = [statistics.mean(math.sqrt(next(r["reg"] for r in log if r["step"] == s)) for log, _, _ in runs)
              for s in steps]
        true = [100 * statistics.mean(next(r["measures"]["colour_accuracy"] for r in log if r["step"] == s)
                                      for log, _, _ in runs) for s in steps]
        proxy = [100 * statistics.mean(next(r["measures"]["proxy_accuracy"] for r in log if r["step"] == s)
                                       for log, _, _ in runs) for s in steps]
        line, = ax.plot(xs, true, lw=1.5, label=f"{v}: true")
        ax.plot(xs, proxy, lw=1, ls="--", color=line.get_color(), label=f"{v}: proxy")
    ax.set_title("over-optimization: true (solid) and proxy (dashed)", fontsize=9)
    ax.set_xlabel("sqrt(reg) = ||theta - theta_0||", fontsize=8)
    ax.set_ylabel("colour accuracy %", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)


def eta_panel(ax, title):
    for i, v in enumerate(("anchor 1e-2", "eta 0")):
        evals = [r[2] for r in (load(v, s) for s in SEEDS) if r and r[2]]
        if evals:
            ys = [100 * statistics.mean(e[str(eta)]["colour_accuracy"] for e in evals) for eta in EVAL_ETAS]
            ax.bar([j + 0.4 * i for j in range(len(EVAL_ETAS))], ys, width=0.4,
                   label="random eta" if v == "anchor 1e-2" else "eta = 0")
    ax.set_xticks([j + 0.2 for j in range(len(EVAL_ETAS))], [f"sampled at eta {e}" for e in EVAL_ETAS], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("held-out colour accuracy %", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("THE DESIGN")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--measure-scales", action="store_true")
    p.add_argument("--evaluate", nargs=3, metavar=("VARIANT", "SEED", "STEP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_scales:
        return measure_scales()
    if args.evaluate:
        return evaluate_here(args.evaluate[0], int(args.evaluate[1]), int(args.evaluate[2]))
    if not args.report_only:
        assert CLAIM_3_RESCALED, "run --measure-scales first and write SCALES and CLAIM_3_RESCALED down"
        # claim 5 first (its endpoint is in seconds: R0 and R0+ of a seed run side by side), then the longest runs
        order = [(v, s) for s in SEEDS for v in ("R0", "R0+")]
        order += [(v, s) for v in VARIANTS if v not in ("R0", "R0+") for s in SEEDS]
        cost = json.load(open(COST)) if os.path.isfile(COST) else {}  # per run, kept over invocations
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            for (v, s), secs in zip(order, pool.map(lambda vs: train(*vs), order)):
                if secs:  # 0: finished by an earlier invocation, whose seconds cost.json keeps
                    cost[f"{v} seed {s}"] = secs
                    json.dump(cost, open(COST, "w"), indent=1)
            evals = [(v, s) for v in ("anchor 1e-2", "eta 0") for s in SEEDS]
            for (v, s), secs in zip(evals, pool.map(lambda vs: evaluate(*vs), evals)):
                if secs:
                    cost[f"{v} eta evaluation seed {s}"] = secs
                    json.dump(cost, open(COST, "w"), indent=1)
    report()


if __name__ == "__main__":
    main()
