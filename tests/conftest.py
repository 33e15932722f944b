"""Test-wide settings: a fixed hypothesis profile, so property tests are reproducible."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "longjax",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("longjax")
