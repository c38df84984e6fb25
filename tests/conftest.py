"""Fixtures shared by several test files."""
import signal

import pytest
import torch

# A shell's background job (e.g. a CI step run with `&`) starts with SIGINT ignored, and every process it starts
# inherits that: the Ctrl-C tests need SIGINT to reach mcsae, so the test processes and their children get the default.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def one_thread():
    "One torch thread for a test module: small CPU forward passes run fastest so, and far faster on a busy machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
