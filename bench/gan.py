"""BigLearn-GAN versus a joint GAN with the same transformers and parameter count, on 8x8 digits.

"Big Cooperative Learning" (eq. 8, App. D) in shape, on scikit-learn's 8x8 digits cut into 2x2
patches (16 continuous tokens of dimension 4), configured by configs/gan_digits.yaml. Arms:
    gan           the joint GAN: S = {} and T = all on every step
    biglearn_gan  the universal BigLearn-GAN: per sample the joint task with probability objective.joint_fraction,
                  else (S, T) from the text model's sampler (S-ratio ~ Beta(objective.source_*), T-ratio of
                  the rest ~ Beta(objective.target_*)); optionally eq. (12) (objective.communication_weight)
Both: the same generator and discriminator classes and sizes, seed, steps, batch, AdamW and R1.

Metrics, all from one digits classifier (scikit-learn MLP) trained once on the training split:
    frechet             Frechet distance between the classifier's hidden features of joint samples
                        (S = {}) and of the test images; frechet_reference: training vs test images
    class_coverage      entropy (nats; log 10 = 2.303 is uniform) of the classifier's labels of the
                        joint samples; class_min_share: the rarest label's share
    class_consistency   BigLearn-GAN completions at each S-ratio (round(ratio x 16) patches of a test
                        image given): the classifier's label of the completed image = the image's label;
                        class_consistency_reference: the same with T copied from another random test image;
                        class_consistency_nearest: T copied from the training image nearest on x_S (a
                        memorising model's completion: what x_S alone can tell)
    completion_diversity  mean pairwise Euclidean pixel distance of 8 completions of one x_S
Figures under --out: gan_joint.png (joint samples of both arms), gan_completion.png (the paper's
Fig. 13 in shape: S-ratio 0 to 0.9 left to right, one noise per row, the real x last), gan_curves.png
(Frechet distance of joint samples and the losses against training CPU time).

    python bench/gan.py --out runs/gan --json runs/gan/metrics.json
    python bench/gan.py --quick                          # about 30 s: checks the script works
    python bench/gan.py --arms biglearn_gan train.steps=500 train.r1_weight=1   # any key of the schema
    python bench/gan.py --chimera-probe 500   # only: can a fresh discriminator tell real images from chimeras?
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.errors import UserError, add_debug_flag, cli_main
from data_pipeline.files import atomic_write
from pretrain.experiments.gan import metrics, objective
from pretrain.experiments.gan import train as gan_train
from pretrain.experiments.gan.config import ARMS, GANExperiment
from pretrain.experiments.vae import patches
from pretrain.train.composition import load
from vae import image_grid, load_data

NAMES = {"gan": "joint GAN (S = {})", "biglearn_gan": "BigLearn-GAN (universal, eq. 8)"}
QUICK = ["model.d_model=32", "model.n_heads=2", "model.generator_layers=1", "model.discriminator_layers=1",
         "model.z_dim=8", "train.steps=30", "train.batch_size=16", "train.eval_every=15", "eval.joint_samples=200",
         "eval.curve_samples=100", "eval.completion_images=100", "eval.diversity_images=10", "eval.classifier_hidden=32"]
FIGURE_RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)  # the paper's Fig. 13 columns
GRID_ROWS, GRID_COLS = 8, 10
PROBE_RATIO = 0.5  # --chimera-probe: the S-ratio of the completion goal


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is one line on stderr and exit status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


class Bench:
    """The data, the classifier and the metrics every arm is measured with."""

    def __init__(self, experiment: GANExperiment, quick: bool):
        self.experiment = experiment
        self.train_x, train_y, self.test_x, self.test_y, self.shape = load_data(experiment, quick)
        if train_y is None or self.test_y is None:
            raise UserError("data.path: bench/gan.py needs train_labels and test_labels (its metrics come from a classifier)")
        self.n_patches, self.patch_dim = self.train_x.shape[1:]
        print("training the digits classifier ...", file=sys.stderr, flush=True)
        e = experiment.eval
        self.classifier = metrics.DigitsClassifier(e.classifier_hidden, experiment.train.seed).fit(
            self.images(self.train_x), train_y)
        self.accuracy = float((self.classifier.predict(self.images(self.test_x)) == self.test_y).mean())
        self.test_features = self.classifier.features(self.images(self.test_x))
        self.frechet_reference = metrics.frechet_distance(self.classifier.features(self.images(self.train_x)),
                                                          self.test_features)

    def images(self, x) -> np.ndarray:
        """Patches [N, L, D] -> images [N, H, W, C] in [0, 1]."""
        return patches.unpatchify(np.asarray(x), self.shape, self.experiment.data.patch_size)

    def joint(self, generator, n: int, seed: int) -> dict:
        """Frechet distance and class coverage of n joint samples; the samples themselves."""
        e = self.experiment.eval
        samples = self.images(gan_train.sample_joint(generator, n, self.n_patches, self.patch_dim, e.batch_size, seed))
        entropy, min_share = metrics.class_coverage(self.classifier.predict(samples))
        return {"frechet": metrics.frechet_distance(self.classifier.features(samples), self.test_features),
                "class_coverage": entropy, "class_min_share": min_share, "samples": samples}

    def completion(self, generator, ratio: float, seed: int) -> dict:
        """Class consistency (and its unconditioned reference) and diversity at one S-ratio."""
        e = self.experiment.eval
        rng, noise = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        n = min(e.completion_images, len(self.test_x))
        x, labels = self.test_x[:n], self.test_y[:n]
        source = objective.source_masks(n, self.n_patches, ratio, rng)
        z = torch.randn(n, generator.config.z_dim, generator=noise)
        completed = self.images(gan_train.complete(generator, x, source, z, e.batch_size))
        other = x[torch.from_numpy((np.arange(n) + rng.integers(1, n, size=n)) % n)]  # never the image itself
        pasted = self.images(torch.where(torch.from_numpy(source)[..., None], x, other))
        nearest = self.train_x[torch.from_numpy(metrics.nearest_on_source(x.numpy(), source, self.train_x.numpy()))]
        memorised = self.images(torch.where(torch.from_numpy(source)[..., None], x, nearest))
        k, m = e.diversity_draws, min(e.diversity_images, n)
        repeated = x[:m].repeat_interleave(k, 0)
        draws = gan_train.complete(generator, repeated, np.repeat(source[:m], k, 0),
                                   torch.randn(m * k, generator.config.z_dim, generator=noise), e.batch_size)
        draws = self.images(draws).reshape(m, k, -1)
        return {"consistency": float((self.classifier.predict(completed) == labels).mean()),
                "reference": float((self.classifier.predict(pasted) == labels).mean()),
                "nearest": float((self.classifier.predict(memorised) == labels).mean()),
                "diversity": float(np.mean([metrics.mean_pairwise_distance(d) for d in draws]))}


def montage(images: np.ndarray) -> np.ndarray:
    """images [n, H, W(, C)] -> one [rows * (H + 1), cols * (W + 1)] array, NaN between digits."""
    images = images.mean(-1) if images.ndim == 4 else images
    height, width = images.shape[1:3]
    out = np.full((GRID_ROWS * (height + 1), GRID_COLS * (width + 1)), np.nan)
    for i, image in enumerate(images[:GRID_ROWS * GRID_COLS]):
        r, c = divmod(i, GRID_COLS)
        out[r * (height + 1):r * (height + 1) + height, c * (width + 1):c * (width + 1) + width] = image
    return out


def draw_joint(samples: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#9ecae1")
    fig, axes = plt.subplots(1, len(samples), figsize=(6.2 * len(samples), 5.4), squeeze=False)
    for ax, (arm, images) in zip(axes[0], samples.items()):
        ax.imshow(montage(images), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set(xticks=[], yticks=[], title=f"{NAMES[arm]}: joint samples p(x)")
    fig.tight_layout()
    fig.savefig(out / "gan_joint.png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def draw_completion(bench: Bench, generator, out: Path, seed: int, n_images: int = 6) -> None:
    """The paper's Fig. 13 in shape: first row the masks (white = S), then one test image per row
    completed at S-ratio 0 (joint generation), 0.1, ..., 0.9 with ONE noise per row; S at a lower
    ratio is a subset of S at a higher one; the real image last."""
    rng, noise = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    n_patches, k = bench.n_patches, len(FIGURE_RATIOS)
    order = np.argsort(rng.random(n_patches))
    masks = np.zeros((k, n_patches), dtype=bool)
    for i, ratio in enumerate(FIGURE_RATIOS):
        masks[i, order[:min(n_patches - 1, int(round(ratio * n_patches)))]] = True
    pixel_masks = bench.images(np.repeat(masks[..., None], bench.patch_dim, -1).astype(np.float32))
    everything = np.ones(pixel_masks.shape[:3] + (1,), dtype=bool)[..., 0]
    shown = np.ones((k + 1,) + everything.shape[1:], dtype=bool)
    rows = [("S (white)", np.concatenate([1 - pixel_masks, np.zeros_like(pixel_masks[:1])]), shown)]
    for i in range(n_images):
        x = bench.test_x[i:i + 1].expand(k, -1, -1)
        z = torch.randn(1, generator.config.z_dim, generator=noise).expand(k, -1)
        completed = bench.images(gan_train.complete(generator, x, masks, z, k))
        rows.append((f"test #{i}", np.concatenate([completed, bench.images(x[:1])]), shown))
    titles = [f"S {int(100 * r)}%" for r in FIGURE_RATIOS] + ["real x"]
    image_grid(rows, titles, out / "gan_completion.png",
               "BigLearn-GAN: x_T ~ p(x_T | x_S), S-ratio 0 (joint generation) to 0.9, one noise per row")


def draw_curves(curves: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm, points in curves.items():
        cpu = [p["cpu_seconds"] for p in points]
        axes[0].plot(cpu, [p["frechet"] for p in points], "o-", label=NAMES[arm])
        axes[1].plot(cpu, [p["class_coverage"] for p in points], "o-", label=NAMES[arm])
        axes[2].plot(cpu, [p["d_loss"] for p in points], "o-", label=f"{arm}: D loss")
        axes[2].plot(cpu, [p["g_loss"] for p in points], "s--", label=f"{arm}: G loss")
    axes[0].set(ylabel="Frechet distance, joint samples vs test", yscale="log")
    axes[1].axhline(np.log(10), color="gray", lw=0.8)
    axes[1].set(ylabel="class coverage: label entropy (nats)")
    axes[2].set(ylabel="loss (window mean)")
    for ax in axes:
        ax.set_xlabel("training CPU seconds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gan_curves.png", dpi=90)
    plt.close(fig)


def probe(train_x: torch.Tensor, experiment: GANExperiment, args) -> None:
    """--chimera-probe: the discriminator's loss against chimeras, printed and optionally as JSON."""
    start, load_start = time.time(), os.getloadavg()[0]
    points = gan_train.chimera_probe(train_x, experiment, args.chimera_probe, PROBE_RATIO)
    t = experiment.train
    print(f"\ndiscriminator alone, real images vs chimeras at S-ratio {PROBE_RATIO} (lr {t.discriminator_lr}, "
          f"betas ({t.beta1}, {t.beta2}), R1 {t.r1_weight}); chance = log 4 = 1.386\n\n| step | D loss (window mean) |\n|---|---|")
    for p in points:
        print(f"| {p['step']} | {p['d_loss']:.3f} |")
    wall, load_end = time.time() - start, os.getloadavg()[0]
    print(f"\nwall {wall:.0f} s; load average {load_start:.2f} at start, {load_end:.2f} at end")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps({"chimera_probe": points, "ratio": PROBE_RATIO, "overrides": args.overrides,
                                            "wall_seconds": wall, "load_average": [load_start, load_end]}, indent=1))


def parse_args(argv):
    parser = OneLineParser(prog="bench/gan.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    d = "(default: %(default)s)"
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.steps=500 (schema: pretrain/experiments/gan/config.py)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)} {d}")
    parser.add_argument("--quick", action="store_true", help="tiny models, 30 steps, small evaluations (a smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the metrics here as JSON")
    parser.add_argument("--out", type=Path, default=Path("runs/gan"), help=f"PNG figures go here {d}")
    parser.add_argument("--no-figures", dest="figures", action="store_false")
    parser.add_argument("--chimera-probe", type=int, default=0, metavar="STEPS",
                        help="train no arm: train a fresh discriminator for STEPS steps on real images against chimeras "
                             "(x_S of one image, x_T pasted from another, S-ratio 0.5) and print its loss "
                             "(pretrain.experiments.gan.train.chimera_probe) " + d)
    parser.add_argument("--threads", type=int, default=1, help=f"torch CPU threads (more only on an idle machine) {d}")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}" if unknown else "--arms is empty")
    args.arms = [a for a in ARMS if a in arms]
    if args.chimera_probe < 0:
        parser.error(f"--chimera-probe must be >= 0, got {args.chimera_probe}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()[0]
    try:  # the config and the data are the user's input: their errors are one line
        experiment = load([*(QUICK if args.quick else []), *args.overrides], cls=GANExperiment, config_name="gan_digits")
        if args.chimera_probe:
            return probe(load_data(experiment, args.quick)[0], experiment, args)
        bench = Bench(experiment, args.quick)
    except ValueError as err:
        raise UserError(err) from None
    t, e = experiment.train, experiment.eval
    results, generators = {}, {}
    for arm in args.arms:
        evaluate = lambda g: {k: v for k, v in bench.joint(g, e.curve_samples, t.seed + 1).items() if k != "samples"}  # noqa: E731
        wall, cpu = time.perf_counter(), time.process_time()
        generator, discriminator, curve = gan_train.fit(arm, bench.train_x, experiment, evaluate)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        generators[arm] = generator
        results[arm] = {**bench.joint(generator, e.joint_samples, t.seed + 2), "curve": curve.points,
                        "train_seconds": wall, "train_cpu_seconds": curve.points[-1]["cpu_seconds"],
                        "train_and_curve_cpu_seconds": cpu,
                        "params_generator": generator.num_parameters(),
                        "params_discriminator": discriminator.num_parameters()}
    completion = {}
    if "biglearn_gan" in generators:
        for ratio in tqdm(e.completion_ratios, desc="completion", unit="S-ratio", file=sys.stderr):
            completion[str(ratio)] = bench.completion(generators["biglearn_gan"], ratio, t.seed + 3)
    if args.figures:
        args.out.mkdir(parents=True, exist_ok=True)
        draw_joint({arm: results[arm]["samples"] for arm in args.arms}, args.out)
        draw_curves({arm: results[arm]["curve"] for arm in args.arms}, args.out)
        if "biglearn_gan" in generators:
            draw_completion(bench, generators["biglearn_gan"], args.out, t.seed + 4)

    print(f"\ndigits classifier (MLP, {e.classifier_hidden} hidden units): test accuracy {100 * bench.accuracy:.1f}%; "
          f"Frechet distance training vs test images {bench.frechet_reference:.2f}")
    print(f"\n| model ({t.steps} steps x {t.batch_size}, R1 {t.r1_weight}) | params (G + D) | train s (CPU s) "
          f"| Frechet distance | class coverage (nats) | rarest class share |\n|---|---|---|---|---|---|")
    for arm in args.arms:
        r = results[arm]
        print(f"| {NAMES[arm]} | {r['params_generator']:,} + {r['params_discriminator']:,} | {r['train_seconds']:.0f} "
              f"({r['train_cpu_seconds']:.0f}) | {r['frechet']:.2f} | {r['class_coverage']:.3f} | "
              f"{100 * r['class_min_share']:.1f}% |")
    if completion:
        print("\n| S-ratio | class consistency | reference: T from another image | reference: T from the nearest "
              "training image on S | diversity (8 draws) |\n|---|---|---|---|---|")
        for ratio, c in completion.items():
            print(f"| {ratio} | {100 * c['consistency']:.1f}% | {100 * c['reference']:.1f}% | {100 * c['nearest']:.1f}% "
                  f"| {c['diversity']:.3f} |")
    wall, load_end = time.time() - start, os.getloadavg()[0]
    print(f"\nwall {wall:.0f} s; load average {load_start:.2f} at start, {load_end:.2f} at end")
    if args.json:
        per_arm = lambda key: {arm: results[arm][key] for arm in args.arms}  # noqa: E731
        payload = {
            "frechet": per_arm("frechet"), "class_coverage": per_arm("class_coverage"),
            "class_min_share": per_arm("class_min_share"),
            "class_consistency": {r: c["consistency"] for r, c in completion.items()},
            "class_consistency_reference": {r: c["reference"] for r, c in completion.items()},
            "class_consistency_nearest": {r: c["nearest"] for r, c in completion.items()},
            "completion_diversity": {r: c["diversity"] for r, c in completion.items()},
            "params": {arm: results[arm]["params_generator"] + results[arm]["params_discriminator"] for arm in args.arms},
            "params_generator": per_arm("params_generator"), "params_discriminator": per_arm("params_discriminator"),
            "classifier_accuracy": bench.accuracy, "frechet_reference": bench.frechet_reference,
            "train_seconds": per_arm("train_seconds"), "train_cpu_seconds": per_arm("train_cpu_seconds"),
            "curves": per_arm("curve"), "wall_seconds": wall, "load_average": [load_start, load_end],
            "quick": args.quick, "overrides": args.overrides,
            "command": " ".join(["python", "bench/gan.py", *(sys.argv[1:] if argv is None else argv)])}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(payload, indent=1))
    if args.figures:
        print(f"figures: {', '.join(str(args.out / n) for n in ('gan_joint.png', 'gan_completion.png', 'gan_curves.png'))}")


if __name__ == "__main__":
    sys.exit(cli_main(main, "bench/gan.py"))
