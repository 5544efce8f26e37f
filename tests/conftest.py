"""Shared fixtures: real components only (plain helpers, which benchmarks use too, are in helpers.py).

* ``ray_local``: one local Ray instance for the whole session (ray.init costs seconds). It declares
  more logical CPUs than the machine has, so 2 Ray Train workers and Ray Data tasks fit beside them.
* ``s3``: moto's S3 server on loopback (as s3fs's own tests use), with a bucket; started before Ray
  so every Ray worker inherits its endpoint and the test credentials.
"""

from __future__ import annotations

import os
import socket

import pytest
from helpers import DATA, dataset_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server on 127.0.0.1 with bucket 'vaepipe-test'; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    import pyarrow.fs as pafs

    pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True
    ).create_dir("vaepipe-test")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local Ray instance per test session, started after the S3 server so workers see it."""
    import ray

    ray.init(
        num_cpus=6,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {k: os.environ[k] for k in _S3_ENV}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def adult_model(tmp_path_factory, ray_local):
    """A small model trained on tests/data/adult by the train job (2 workers, 2 epochs); yields its model_dir."""
    from jobs import train

    root = tmp_path_factory.mktemp("adult_model")
    spec_path = root / "adult.yaml"
    spec_path.write_text(dataset_spec("adult").to_yaml())
    model_dir = str(root / "model")
    args = "--workers 2 --epochs 2 --kl-warmup-epochs 1 --latent-dim 4 --hidden 32 32 --batch-size 256 --lr 5e-3"
    args += " --seed 0 --mc-samples 4 --iw-samples 16 --reference-rows 2000 --baseline-rows 2000"
    data = str(DATA / "adult" / "adult.parquet")
    rc = train.main(["--data", data, "--spec", str(spec_path), "--model-dir", model_dir, *args.split()])
    assert rc == 0, "the train job failed to build the adult_model fixture"
    yield model_dir
