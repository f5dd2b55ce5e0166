"""BigLearn-VAE versus a jointly trained VAE with the same transformer and parameter count.

"Big Learning Variational Auto-Encoders" in shape, on scikit-learn's 8x8 digits cut into 2x2
patches (16 continuous tokens of dimension 4), configured by configs/vae_digits.yaml:

- both models trained with the same optimiser, batch and number of steps, or (train.cpu_minutes=M)
  the same CPU time each;
- test JointELBO (S empty, T = all; the paper's Fig. 2), nats per image, and its learning curves
  against training CPU time (eval.curve_points points, one z draw per test image);
- linear-probe accuracy of the mean of p(z | x_S) at several S-ratios (the paper's Fig. 4);
- PNG grids: inference with incomplete data and arbitrary in-painting (the paper's Fig. 3); the
  learning curves (vae_curves.png).

Prints tables; `--json PATH` writes joint_elbo / probe_accuracy / params (and more) as JSON.

    python bench/vae.py --out runs/vae --json runs/vae/metrics.json
    python bench/vae.py --quick                   # a smoke run in seconds
    python bench/vae.py train.steps=500           # any key of pretrain/experiments/vae/config.py
    python bench/vae.py train.cpu_minutes=8 train.steps=100000   # equal CPU time, not equal steps
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

from data_pipeline.errors import UserError, add_debug_flag, cli_main
from data_pipeline.files import atomic_write
from pretrain.experiments.vae import objective, patches
from pretrain.experiments.vae import train as vae_train
from pretrain.experiments.vae.config import VAEExperiment
from pretrain.train.composition import load

KINDS = ("vae", "biglearn_vae")
NAMES = {"vae": "VAE (jointly trained, eq. 1)", "biglearn_vae": "BigLearn-VAE (universal, eq. 7)"}
QUICK = ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.encoder_layers=1", "model.z_dim=8",
         "train.steps=30", "train.batch_size=16", "train.warmup_steps=5", "eval.probe_draws=1", "eval.elbo_samples=1",
         "eval.curve_points=3"]
FIGURE_RATIOS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1)
MISSING_COLOUR = "#9ecae1"  # patches outside S


def load_data(experiment, quick: bool):
    """(train patches, train labels, test patches, test labels, image shape) as torch/numpy."""
    d = experiment.data
    if d.path:
        train_images, train_labels, test_images, test_labels = patches.load_npz(d.path)
    else:
        train_images, train_labels, test_images, test_labels = patches.load_digits_split(d.split_seed, d.test_fraction)
    train_x = patches.patchify(train_images, d.patch_size, "data.train_images")
    test_x = patches.patchify(test_images, d.patch_size, "data.test_images")
    shape = patches.check_images(test_images[:1], d.patch_size, "data.test_images").shape[1:]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"data.test_images have {test_x.shape[1:]} patch tokens, data.train_images {train_x.shape[1:]}")
    if quick:  # a subset keeps the probe and the ELBO sweep to seconds
        train_x, test_x = train_x[:400], test_x[:200]
        train_labels = None if train_labels is None else train_labels[:400]
        test_labels = None if test_labels is None else test_labels[:200]
    return torch.from_numpy(train_x), train_labels, torch.from_numpy(test_x), test_labels, shape


def image_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], column_titles, path: Path, title: str) -> None:
    """rows: (label, images [n_cols, H, W(, C)], shown [n_cols, H, W] bool) -> one PNG; pixels
    outside `shown` are drawn in MISSING_COLOUR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.0 * n_cols + 0.9, 1.0 * n_rows + 0.6), squeeze=False)
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad=MISSING_COLOUR)
    for r, (label, images, shown) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            image = images[c].mean(-1) if images[c].ndim == 3 else images[c]
            ax.imshow(np.ma.masked_array(image, mask=~shown[c]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def draw_figures(model, test_x: torch.Tensor, shape, patch_size: int, out: Path, seed: int, n_images: int = 5):
    """Inference with incomplete data (x_S, then the mean of p(x | z), z ~ p(z | x_S)) and
    arbitrary in-painting (x_S kept, x_T = mean of p(x_T | z, x_S), z ~ p(z | x_S)); each image
    keeps one random patch order, so S at a lower ratio is a subset of S at a higher one."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    x = test_x[:n_images]
    n_patches = x.shape[1]
    order = np.argsort(rng.random((n_images, n_patches)), axis=1)
    to_images = lambda p: patches.unpatchify(p.numpy(), shape, patch_size)  # noqa: E731
    shown_pixels = lambda mask: patches.unpatchify(  # noqa: E731
        np.repeat(mask[..., None], x.shape[-1], axis=-1), shape, patch_size).all(-1)
    inference_rows, inpainting_rows = [], []
    for i in range(n_images):
        masks = np.zeros((len(FIGURE_RATIOS), n_patches), dtype=bool)
        for k, ratio in enumerate(FIGURE_RATIOS):
            masks[k, order[i, :max(1, int(round(ratio * n_patches)))]] = True
        image = x[i:i + 1].expand(len(FIGURE_RATIOS), -1, -1)
        mean, logvar = objective.encode_observed(model, image, masks)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        recon = objective.decode_into(model, image, np.zeros_like(masks), z)
        painted = objective.decode_into(model, image[1:], masks[1:], z[1:])
        everything = np.ones_like(shown_pixels(masks))
        inference_rows += [(f"#{i} x_S", to_images(image), shown_pixels(masks)),
                           ("x ~ p(x|z)", to_images(recon.clamp(0, 1)), everything)]
        inpainting_rows += [(f"#{i} x_S", to_images(image[1:]), shown_pixels(masks[1:])),
                            ("in-painted", to_images(painted.clamp(0, 1)), everything[1:])]
    titles = [f"S {int(100 * r)}%" for r in FIGURE_RATIOS]
    image_grid(inference_rows, titles, out / "vae_inference.png",
               "inference with incomplete data: z ~ p(z | x_S), image = mean of p(x | z)")
    image_grid(inpainting_rows, titles[1:], out / "vae_inpainting.png",
               "arbitrary in-painting: x_T = mean of p(x_T | z, x_S), z ~ p(z | x_S)")


def draw_curves(results: dict, out: Path) -> None:
    """Test JointELBO (one z draw per image) and its terms against training CPU time, both models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, r in results.items():
        cpu = [p["cpu_seconds"] for p in r["curve"]]
        for ax, key in zip(axes, ("elbo", "log_lik", "kl")):
            ax.plot(cpu, [p[key] for p in r["curve"]], "o-", ms=3, label=f"{NAMES[kind]} ({r['steps']} steps)")
    for ax, label in zip(axes, ("test JointELBO (beta = train.kl_weight), nats", "E log p(x | z), nats", "KL, nats")):
        ax.set(xlabel="training CPU seconds", ylabel=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "vae_curves.png", dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.steps=500 (schema: pretrain/experiments/vae/config.py)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, data subsets (a smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the metrics here as JSON")
    parser.add_argument("--out", type=Path, default=Path("runs/vae"), help="PNG grids go here")
    parser.add_argument("--no-figures", dest="figures", action="store_false")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more only on an idle machine)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    try:  # the config and the data are the user's input: their errors are one line
        experiment = load([*(QUICK if args.quick else []), *args.overrides], cls=VAEExperiment, config_name="vae_digits")
        train_x, train_y, test_x, test_y, shape = load_data(experiment, args.quick)
    except ValueError as err:
        raise UserError(err) from None
    t, e = experiment.train, experiment.eval
    results = {}
    for kind in KINDS:
        start = time.perf_counter()
        curve_elbo = lambda m: vae_train.test_joint_elbo(m, test_x, t.kl_weight, 1, e.batch_size, t.seed)  # noqa: E731
        model, curve = vae_train.fit(kind, train_x, experiment, evaluate=curve_elbo)
        seconds, cpu_seconds = time.perf_counter() - start, curve[-1]["cpu_seconds"]
        elbo = vae_train.test_joint_elbo(model, test_x, t.kl_weight, e.elbo_samples, e.batch_size, t.seed)
        codes = lambda x, masks: vae_train.codes(model, x, masks, e.batch_size)  # noqa: E731
        probes = {} if train_y is None else {
            str(r): vae_train.linear_probe(codes, train_x, train_y, test_x, test_y, r, e.probe_draws, t.seed)
            for r in e.probe_ratios}
        results[kind] = {"model": model, "seconds": seconds, "cpu_seconds": cpu_seconds, "elbo": elbo, "probe": probes,
                         "params": model.num_parameters(), "curve": curve, "steps": curve[-1]["step"]}
    pixels = {} if train_y is None else {
        str(r): vae_train.linear_probe(vae_train.masked_pixels, train_x, train_y, test_x, test_y, r, e.probe_draws,
                                       t.seed) for r in e.probe_ratios}
    if args.figures:
        args.out.mkdir(parents=True, exist_ok=True)
        draw_figures(results["biglearn_vae"]["model"], test_x, shape, experiment.data.patch_size, args.out, t.seed)
        draw_curves(results, args.out)

    budget = f"{t.cpu_minutes:g} CPU min each" if t.cpu_minutes else f"{t.steps} steps each"
    print(f"\n| model ({len(test_x)} test images, {budget}, batch {t.batch_size}, beta {t.kl_weight}) | params | steps "
          f"| train s (CPU s) | test JointELBO | ELBO beta=1 | log p(x|z) | KL |\n|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        r = results[kind]
        print(f"| {NAMES[kind]} | {r['params']:,} | {r['steps']} | {r['seconds']:.0f} ({r['cpu_seconds']:.0f}) | "
              f"{r['elbo']['elbo']:.2f} | "
              f"{r['elbo']['elbo_beta1']:.2f} | {r['elbo']['log_lik']:.2f} | {r['elbo']['kl']:.2f} |")
    if train_y is not None:
        print("\n| S-ratio | linear probe on p(z|x_S), BigLearn-VAE | the same, VAE | supervised reference: "
              "logistic regression on the observed pixels + mask |\n|---|---|---|---|")
        for ratio in pixels:
            print(f"| {ratio} | {100 * results['biglearn_vae']['probe'][ratio]:.1f}% | "
                  f"{100 * results['vae']['probe'][ratio]:.1f}% | {100 * pixels[ratio]:.1f}% |")
    metrics = {
        "joint_elbo": {kind: results[kind]["elbo"]["elbo"] for kind in KINDS},
        "joint_elbo_beta1": {kind: results[kind]["elbo"]["elbo_beta1"] for kind in KINDS},
        "probe_accuracy": results["biglearn_vae"]["probe"],
        "probe_accuracy_vae": results["vae"]["probe"],
        "probe_accuracy_masked_pixels": pixels,
        "params": {kind: results[kind]["params"] for kind in KINDS},
        "train_seconds": {kind: results[kind]["seconds"] for kind in KINDS},
        "train_cpu_seconds": {kind: results[kind]["cpu_seconds"] for kind in KINDS},
        "train_steps": {kind: results[kind]["steps"] for kind in KINDS},
        "curves": {kind: results[kind]["curve"] for kind in KINDS},
        "load_average": [load_start, os.getloadavg()[0]], "quick": args.quick, "overrides": args.overrides,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(metrics, indent=2))
    if args.figures:
        print(f"\nfigures: {args.out / 'vae_inference.png'}, {args.out / 'vae_inpainting.png'}, {args.out / 'vae_curves.png'}")


if __name__ == "__main__":
    sys.exit(cli_main(main, "bench/vae.py"))
