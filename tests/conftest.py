"""Suite-wide settings: hypothesis without per-example deadlines (the 2-core machines that run the suite are shared
and noisy; a property test must fail on a wrong answer, not on a slow one)."""

from hypothesis import settings

settings.register_profile("stlflow", deadline=None)
settings.load_profile("stlflow")
