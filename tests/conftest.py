import os

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before
# torch (which imports triton) is imported.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from model.checkpoint_maker import make_checkpoint

    return make_checkpoint("tiny", seed=0, out_dir=tmp_path_factory.mktemp("tiny"))
