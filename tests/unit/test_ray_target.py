"""Which Ray a run uses: the config's address, else RAY_ADDRESS (Ray Jobs), else a private local one."""

from cluster.bootstrap import ray_target
from cluster.config import RunConfig


def test_config_address_wins_over_the_environment():
    cfg = RunConfig.model_validate({"ray": {"address": "10.0.0.5:6379"}})
    assert ray_target(cfg, {"RAY_ADDRESS": "127.0.0.1:7000"}) == ("10.0.0.5:6379", "ray.address")


def test_a_submitted_job_joins_the_cluster_ray_jobs_names():
    assert ray_target(RunConfig(), {"RAY_ADDRESS": "127.0.0.1:7000"}) == ("127.0.0.1:7000", "RAY_ADDRESS")


def test_no_address_means_a_private_ray_never_a_discovered_one():
    address, why = ray_target(RunConfig(), {"RAY_ADDRESS": ""})
    assert address is None and "RAY_ADDRESS" in why
