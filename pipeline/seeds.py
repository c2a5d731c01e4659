"""Every seeded draw of the pipeline and where its seed comes from: the one story for seeds.

The rule: a step seeds its draws from its **own** section's ``seed``, so the step's config digest
covers it and changing one step's seed redoes that step and what follows, nothing upstream.
Draws made per test image add the image index (``seed + i`` or the pair ``[seed, i]``), so an
image's result depends neither on the batch size nor on which images ran before (a resumed step
redoes exactly the missing ones). ``run.seed`` seeds only the draws of tools that run outside the
steps; an experiment builder's ``seed`` is a grid parameter (default 0) recorded in the variant's
``variant.json``. The functions below give the derived values the steps use; every seed defaults
to 0.

==============================  =====================================  ==========================================
purpose                          seed                                   where
==============================  =====================================  ==========================================
synthetic data set               images ``synthetic.seed``; read-out    prepare_data/synthetic.py
                                 ``[synthetic.seed, subject]``
VDVAE posterior sample           ``features.seed``; test images          regression/extract_features.py
(regression targets)             ``features.seed + 1,000,000``
VDVAE prior sample of image i    ``vdvae_init.seed + i``                 reconstruct/vdvae_init.py
diffusion noise of image i       ``versatile.seed + i`` (or one stream  reconstruct/versatile.py
                                 from ``versatile.seed``,
                                 ``versatile.reference_rng``)
"w/o VDVAE" random latent /      ``[versatile.seed, i]``                 reconstruct/versatile.py
noise image of image i
"shuffled" text control          ``versatile.seed`` (one permutation)   reconstruct/versatile.py
iCNN initial code of image i     ``icnn.seed + i``                       reconstruct/icnn/recon.py
adversarial target draw          ``run.seed`` (``--seed``)               adv_pert/perturb.py (its CLI)
variant builders (dropout        the grid's ``seed`` / ``draw``          experiments/builders.py
subsets, shuffled captions,      parameters (default 0)
perturbation sets)
==============================  =====================================  ==========================================

``versatile.seed`` drives three draws (noise, the "w/o VDVAE" init, the shuffled-text control) as
the reference's single seed does; each has its own generator, so switching a control on shifts
no other draw.
"""
from __future__ import annotations

#: Test images draw their VDVAE posterior noise from their own range, so train and test never share a seed.
TEST_SEED_OFFSET = 1_000_000


def vdvae_posterior(cfg, split: str) -> int:
    """Seed of the VDVAE posterior sampling of ``split``'s regression targets."""
    return cfg.features.seed + (TEST_SEED_OFFSET if split == "test" else 0)


def per_image(seed: int, indices) -> list[int]:
    """``seed + i`` for each test image index ``i`` (VDVAE prior, diffusion noise, iCNN init)."""
    return [int(seed) + int(i) for i in indices]


def tool_seed(cfg) -> int:
    """Seed of a tool that runs outside the steps (the adversarial-target draw)."""
    return cfg.run.seed
