"""diffalign: fast diffusion samplers as diffusers schedulers, shipped small models, and preference alignment."""


def load_pipeline(name_or_path: str, device="cpu", **kwargs):
    """Load a diffusers pipeline: ``"builtin:digits"``/``"builtin:fashion"`` (shipped), a local directory or a hub id.

    See :func:`diffalign.pipelines.load_pipeline`.
    """
    from .pipelines.class_conditional import load_pipeline as _load

    return _load(name_or_path, device=device, **kwargs)
