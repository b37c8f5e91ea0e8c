import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from model.checkpoint_maker import make_checkpoint

    return make_checkpoint("tiny", seed=0, out_dir=tmp_path_factory.mktemp("tiny"))
