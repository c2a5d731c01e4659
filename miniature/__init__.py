"""The trained miniature Brain-Diffuser: training (``miniature.train``, ``make demo-models``), its
report (``miniature.report``) and the committed weights (``miniature/weights/``). The architectures
and loaders are ``models.miniature``'s (re-exported here).
"""
from models.miniature import (  # noqa: F401
    ARCH_SEED, FILES, MANIFEST, NORM_GROUPS, REBUILD, UNET_CHANNELS, VAE_CHANNELS, WEIGHTS_DIR, _sha256, _state,
    build_clip, build_vdvae, build_versatile, load_clip, load_vdvae, load_versatile, read_manifest,
)
