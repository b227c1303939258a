"""Mutation pass over r0.py's training step: put one realistic bug at a time into a copy of the project, run the test
suite against it, and report which bugs the suite catches. A maintainer's tool, not part of CI.

    python .ci/mutants.py                        # every mutant against test_r0.py
    python .ci/mutants.py --tests OLD_test.py    # the same mutants against another version of the suite
    python .ci/mutants.py --only 3,7             # some mutants

A mutant is caught when any test fails. To save time each mutant first runs the fast tests most likely to catch
it (FIRST_PASS, those the suite has, in that order, stopping at the first failure) and only a survivor runs the
whole suite (on both cores if pytest-xdist is installed); a mutant that survives has passed the whole suite.
Mutants are plain string replacements: each must match r0.py exactly once.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (what the bug does to training, the text in r0.py, its replacement)
MUTANTS = [
    ("random eta off in r0_step", "m.alphas_cumprod, random_eta=cfg.random_eta, generator=generator,",
     "m.alphas_cumprod, random_eta=False, generator=generator,"),
    ("weight regularizer left out of the loss", "loss = surrogate + cfg.weight_reg * reg", "loss = surrogate"),
    ("R0+'s k never reaches the generator", "stop_at=k)  # (B,4,h,w)", "stop_at=None)  # (B,4,h,w)"),
    ("R0+ draws k from 0..K-2 only", "k = int(torch.randint(0, K, (1,)", "k = int(torch.randint(0, K - 1, (1,)"),
    ("grad accumulation not divided by the micro-batches", "(loss / cfg.grad_accum).backward()", "loss.backward()"),
    ("non-finite gradient behind a finite loss applied", "applied = finite and math.isfinite(grad_norm)",
     "applied = finite"),
    ("latent-space (cfg) term dropped from the surrogate",
     "surrogate = -((g_pix * pixels).sum() + (g_lat * x0_hat).sum()) / B", "surrogate = -(g_pix * pixels).sum() / B"),
    ("gradient clipping disabled", "clip_grad_norm_(params, cfg.grad_clip)", "clip_grad_norm_(params, float('inf'))"),
    ("eta drawn once per batch, not per sample",
     "eta_i = torch.rand(B, generator=generator, device=x.device).view(B, 1, 1, 1)",
     "eta_i = torch.rand(1, generator=generator, device=x.device).expand(B).reshape(B, 1, 1, 1)"),
    ("gradient normalized per batch, not per sample", 'norm = g.flatten(1).norm(dim=1) if per == "sample" else',
     'norm = g.norm().expand(len(g)) if per == "sample" else'),
    ("reward weights ignored", "grads[reward.space] += weights[name] * grad", "grads[reward.space] += grad"),
    ("reward gradients not normalized", 'grad = grad.float() if normalize == "none" else normalize_gradient(',
     'grad = grad.float() if True else normalize_gradient('),
    ("surrogate sign flipped (reward minimized)", "surrogate = -((g_pix * pixels).sum()", "surrogate = ((g_pix * pixels).sum()"),
    ("surrogate not divided by the batch size", "(g_lat * x0_hat).sum()) / B", "(g_lat * x0_hat).sum())"),
    ("cfg reward direction flipped", "(a_t / (1 - a_t)).sqrt() * (eps_u - eps_c)", "(a_t / (1 - a_t)).sqrt() * (eps_c - eps_u)"),
    ("cfg reward without its chain-rule factor", "return gap, (a_t / (1 - a_t)).sqrt() * (eps_u - eps_c)",
     "return gap, (eps_u - eps_c)"),
    ("cfg reward without the unconditional branch",
     "emb = torch.cat([text_emb, self.uncond_emb.expand(B, -1, -1).to(text_emb.dtype)])",
     "emb = torch.cat([text_emb, text_emb])"),
    ("x0_hat with (1 - a_t) instead of its square root", "return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5",
     "return (x_t - (1 - alpha_bar_t) * eps) / alpha_bar_t**0.5"),
    ("DDIM-eta update without its noise term", " + sigma * step_noise", ""),
    ("R0+ rewards x_t instead of x0_hat of step k",
     "if i == stop_at and i < num_steps - 1:  # R0+ stops here, and the rewards read this x0_hat\n                return x0_hat",
     "if i == stop_at and i < num_steps - 1:  # R0+ stops here, and the rewards read this x0_hat\n                return x"),
    ("R0+'s graph cut ignored by generate",
     "torch.set_grad_enabled(torch.is_grad_enabled() and (stop_at is None or i >= stop_at))",
     "torch.set_grad_enabled(torch.is_grad_enabled())"),
    ("decoded pixels left in [-1,1]", "return (images / 2 + 0.5).clamp(0, 1)", "return images.clamp(0, 1)"),
    ("LoRA regularizer without the scaling", "total = total + scaling ** 2 * ((B.T @ B) * (A @ A.T)).sum()",
     "total = total + ((B.T @ B) * (A @ A.T)).sum()"),
    ("full fine-tuning regularizer as a mean", 'F.mse_loss(p, p0, reduction="sum")', 'F.mse_loss(p, p0, reduction="mean")'),
    ("gradients never zeroed between steps", "optimizer.zero_grad(set_to_none=True)  # free the gradients",
     "pass  # free the gradients"),
    ("AdamW with weight decay (pulls weights to 0)", "lr=cfg.lr, weight_decay=0.0, fused", "lr=cfg.lr, weight_decay=1e-2, fused"),
    ("--lr ignored", "torch.optim.AdamW(params, lr=cfg.lr,", "torch.optim.AdamW(params, lr=1e-4,"),
    ("text features not normalized", "return F.normalize(self.model.encode_text(tokens).float(), dim=-1)",
     "return self.model.encode_text(tokens).float()"),
    ("image features normalized in the tower's bf16", "img_feat = clip_model.encode_image(image.to(next(clip_model.parameters()).dtype)).float()",
     "img_feat = clip_model.encode_image(image.to(next(clip_model.parameters()).dtype), normalize=True).float()"),
    ("CLIP normalization skipped in preprocessing", "    return (x - mean) / std\n", "    return x\n"),
    ("resume does not restore the generator", 'run.generator.set_state(rng["generator"])', "pass"),
    ("a bad step still counts as a good one", "run.bad_steps = 0 if applied else run.bad_steps + 1",
     "run.bad_steps = 0"),
    ("ImageReward's raw head output, not in its units", "return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD", "return raw"),
    ("LoRA adapters left off to_out.0", 'target_modules=["to_k", "to_q", "to_v", "to_out.0"]',
     'target_modules=["to_k", "to_q", "to_v"]'),
    ("files unpickled with weights_only=False", 'torch.load(path, map_location="cpu", weights_only=True)',
     'torch.load(path, map_location="cpu", weights_only=False)'),
    ("AdamW's state created lazily (step 2 heavier than the retried step 1)",
     "allocate_optimizer_state(optimizer, params)  # Plumbing", "pass  # Plumbing"),
    ("AdamW's step count not reset after its state is created", 'state["step"].zero_()', "pass"),
    ("an older config's --rewards text not parsed on resume", 'saved["rewards"] = parse_rewards(saved["rewards"])',
     "pass"),
    ("resume ignores the frozen models' fingerprint", "if saved and not all(math.isclose(", "if False and not all(math.isclose("),
    ("a checkpoint that cannot be written is ignored", '        raise UserError(f"could not write checkpoint {path}',
     '        return last\n        raise UserError(f"could not write checkpoint {path}'),
    ("a full disk ends the run at the next grid or log line", "    except OSError as err:\n        if not run.write_failed:",
     "    except ZeroDivisionError as err:\n        if not run.write_failed:"),
    ("the proxy's log-probability of another colour", "return logp.gather(1, wanted[:, None])[:, 0] * has_colour",
     "return logp.gather(1, (wanted[:, None] + 1) % len(COLOURS))[:, 0] * has_colour"),
    ("a toy run trains on its held-out prompts too", "train_prompts = [p for p in prompts if p not in unseen]",
     "train_prompts = list(prompts)"),
    ("content_kept without centring (colour counts as content)",
     "x, y = (t.flatten(2) - t.flatten(2).mean(-1, keepdim=True) for t in (images, base))",
     "x, y = (t.flatten(2) for t in (images, base))"),
    ("held-out measures of R0+'s intermediate step, not the final output", "                         cfg.steps, cfg.resolution, cfg.precision, eta)",
     "                         max(cfg.steps - 1, 1) if cfg.r0_plus else cfg.steps, cfg.resolution, cfg.precision, eta)"),
    ("the out-of-memory retry does not restart the step's draws", "generator.set_state(draws[0])  # the step starts",
     "pass  # the step starts"),
    ("a second Ctrl-C does not quit at once", "if stop.signum is not None:\n            os._exit(128 + signum)",
     "if False:\n            os._exit(128 + signum)"),
    ("a resume whose config.json is gone or unreadable ends in a traceback",
     "except (OSError, json.JSONDecodeError):\n            raise UserError(f\"--resume", "except ():\n            raise UserError(f\"--resume"),
    ("the other-prompts refusal names the saved prompt file, not the one given",
     'f"the prompts in {cfg.prompts} differ', 'f"the prompts in {state[\'config\'][\'prompts\']} differ'),
    ("--overwrite removes the previous run before the set-up that can fail",
     'check_writable(cfg.output_dir, "--output-dir")\n',
     'check_writable(cfg.output_dir, "--output-dir")\n        for f in existing:\n'
     '            shutil.rmtree(p) if os.path.isdir(p := os.path.join(cfg.output_dir, f)) else os.remove(p)\n'),
    ("a signal while the final pipeline is written cuts it off midway",
     "        finish_run(run, cfg)  # a signal now", "    finish_run(run, cfg)  # a signal now"),
    ("a resume whose checkpoint names other weights goes on from LoRA's init",
     'if set(state["trainable"]) != {n for n', 'if False and set(state["trainable"]) != {n for n'),
    ("a skipped micro-batch's graph kept beside the next one's", "        del loss  # a skipped", "        pass  # a skipped"),
    ("a resume takes --rewards in the order typed, not the run's", "**DEFAULTS, **saved, **kept,",
     "**DEFAULTS, **saved, **typed,"),
    ("a resume into another --output-dir silently continues the run in place",
     'if "output_dir" in typed and os.path.abspath(', 'if False and os.path.abspath('),
]

# fast tests that exercise the step, the sampler and the rewards (of this suite and of earlier versions): a first
# pass, in this order, before the whole suite
FIRST_PASS = [
    "test_surrogate_gradient_equals_the_direct_per_sample_per_reward_computation",
    "test_r0_plus_rewards_x0_hat_of_step_k_with_one_unet_call_in_the_graph_and_k_covers_every_step",
    "test_optimizer_step_applies_the_clipped_gradient_of_the_micro_batch_mean",
    "test_a_non_finite_micro_batch_leaves_weights_and_optimizer_state_untouched",
    "test_cfg_reward_gradient_is_d_log_p_c_given_x_t_and_a_step_along_it_raises_it",
    "test_random_eta_is_drawn_per_sample_and_per_step",
    "test_a_cfg_only_run_moves_the_generator",
    "test_x0_from_eps_inverts_forward_diffusion_and_matches_ddim",
    "test_sampler_eta0_equals_diffusers_ddim",
    "test_sampler_eta_positive_matches_ddim_with_the_same_noise_and_is_seeded",
    "test_r0_plus_cuts_the_graph_before_the_sampled_step",
    "test_clip_preprocess_agrees_with_open_clip_transform",
    "test_clip_family_reward_is_the_cosine_of_open_clip_features",
    "test_every_reward_passes_gradient_to_its_input_and_none_to_its_model",
    "test_normalization_gives_each_reward_unit_per_sample_norm_before_weighting",
    "test_weight_regularizer_zero_at_init_grows_after_a_step_and_grads_reach_only_the_unet",
    "test_weight_regularizer_keeps_no_weight_sized_tensor_for_the_backward",
    "test_lora_regularizer_equals_the_merged_weight_change",
    "test_imagereward_gives_the_scores_and_gradients_of_its_original_code",
    "test_lora_adapts_every_attention_projection_of_the_unet_and_nothing_else",
    "test_a_checkpoint_whose_pickle_would_run_code_is_refused_unread",
    "test_clip_family_features_are_normalized_in_fp32_on_a_bf16_tower",
    "test_the_first_step_is_the_heaviest_so_its_out_of_memory_retry_covers_the_run",
    "test_out_of_gpu_memory_on_the_first_step_halves_the_micro_batch_and_keeps_the_run_exact",
    "test_interrupt_finishes_the_step_saves_a_checkpoint_and_says_how_to_resume",
    "test_a_run_written_by_an_older_r0_py_resumes_with_or_without_its_flags_typed_again",
    "test_resume_refuses_frozen_models_other_than_those_the_run_started_from",
    "test_resume_refuses_another_kind_of_device_but_allows_another_gpu",
    "test_a_full_disk_warns_once_keeps_training_and_stops_at_a_checkpoint_that_cannot_be_written",
    "test_proxy_is_a_learned_colour_classifier_whose_gradient_reaches_the_pixels",
    "test_content_kept_is_1_for_the_base_model_and_under_a_pure_change_of_colour",
    "test_a_toy_run_never_trains_on_its_held_out_prompts_and_measures_them",
    "test_overwrite_keeps_the_previous_run_until_the_set_up_has_worked",
    "test_an_interrupt_while_the_final_pipeline_is_written_lets_it_be_written_whole",
    "test_resume_refuses_a_checkpoint_whose_trained_weights_this_unet_does_not_have",
    "test_a_skipped_micro_batch_frees_its_graph_before_the_next_one_is_built",
    "test_resume_keeps_the_runs_reward_order_when_the_same_rewards_are_typed_in_another",
    "test_resume_refuses_an_output_dir_other_than_the_run_it_continues",
]


def run_pytest(folder, test_file, extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if "-n" in extra:  # one thread per xdist worker: the workers, not torch's threads, share the cores
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_file, *extra]
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    return out.returncode, last


def have_xdist():
    try:
        import xdist  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests", default=os.path.join(HERE, "test_r0.py"), help="the test file to judge")
    p.add_argument("--only", help="comma-separated mutant numbers (1-based)")
    args = p.parse_args()
    source = open(os.path.join(HERE, "r0.py")).read()
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(1, len(MUTANTS) + 1)
    caught = 0
    print(f"| # | mutant | verdict | by | seconds |\n|---|---|---|---|---|", flush=True)
    for i in ([0] if not args.only else []) + list(chosen):  # 0: no mutant, the control: the suite must pass
        name, old, new = MUTANTS[i - 1] if i else ("none (control)", "", "")
        assert not i or source.count(old) == 1, f"mutant {i} ({name}) does not match r0.py exactly once"
        with tempfile.TemporaryDirectory() as d:
            for f in ("sample.py", "prompts.txt"):
                shutil.copy(os.path.join(HERE, f), d)
            shutil.copy(args.tests, os.path.join(d, "test_r0.py"))
            open(os.path.join(d, "r0.py"), "w").write(source.replace(old, new) if i else source)
            t0 = time.time()
            suite = open(args.tests).read()
            first = [f"test_r0.py::{t}" for t in FIRST_PASS if f"def {t}(" in suite]
            code, last = run_pytest(d, first[0], first[1:]) if first and i else (0, "")
            by = "first pass"
            if code == 0:  # survived the first pass: the whole suite decides
                code, last = run_pytest(d, "test_r0.py", ["-n", "2"] if have_xdist() else [])
                by = "whole suite"
        verdict = "survived" if code == 0 else "caught"
        if not i:
            assert code == 0, f"the suite fails without any mutant: {last}"
            print(f"| 0 | none (control) | passes | whole suite: {last} | {time.time() - t0:.0f} |", flush=True)
            continue
        caught += code != 0
        print(f"| {i} | {name} | {verdict} | {by}: {last} | {time.time() - t0:.0f} |", flush=True)
    print(f"\ncaught {caught} of {len(chosen)} mutants")


if __name__ == "__main__":
    main()
