import logging

import pytest
import ray

# Test envs and test modules travel to the Ray workers by value, as any module that
# is not installed does (ray_eval.backends.pickling): the workers need no tests/ on their path.

NUM_CPUS = 4  # logical CPUs of the shared test instance (the CI machine has 2 cores)


@pytest.fixture
def ray_local():
    """A Ray instance shared by the tests that use it, started on first use."""
    if not ray.is_initialized():
        ray.init(
            address="local",  # our own instance, never another one running on the machine
            num_cpus=NUM_CPUS,
            include_dashboard=True,  # the state API (list_actors) needs it
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    yield
    # left running for the next test; shut down at the end of the session


@pytest.fixture
def no_ray():
    """For tests that start their own Ray (a multi-node Cluster)."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    if ray.is_initialized():
        ray.shutdown()
