"""Adapter names, storage (local folder and S3 on a local moto server) and the per-replica LRU, without Ray."""

import asyncio
import json
import shutil
from pathlib import Path

import boto3
import s3fs
import pytest

from llmserve.adapters import AdapterStore, LoadedAdapters, check_adapter_name
from llmserve.config import LoraConfig
from llmserve.errors import BadRequestError, ModelNotFoundError
from llmserve.testing import FakeEngine
from tests.e2e.conftest import free_port


def write_adapter(folder, rank=8):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")


@pytest.fixture
def local_root(tmp_path):
    root = tmp_path / "adapters"
    for name in ["sql", "chat", "code"]:
        write_adapter(root / name)
    write_adapter(root / "wide", rank=64)
    (root / "notes").mkdir()  # a folder without adapter_config.json is not an adapter
    write_adapter(tmp_path / "secret")
    return root


@pytest.mark.parametrize("name", ["sql", "v1.2", "a_b-c"])
def test_plain_names_pass(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "..", ".", "../secret", "a/b", "/etc", "a\\b", "%2e%2e", "s3://x", ".hidden", "a..b", "x" * 200])
def test_names_that_could_leave_the_path_are_400(name):
    with pytest.raises(BadRequestError):
        check_adapter_name(name)


def test_local_folder_lists_and_fetches_in_place(local_root):
    for path in (str(local_root), f"file://{local_root}"):
        store = AdapterStore(LoraConfig(dynamic_lora_loading_path=path))
        assert asyncio.run(store.names()) == ["chat", "code", "sql", "wide"]
        assert asyncio.run(store.fetch("sql")) == str(local_root / "sql")
        with pytest.raises(ModelNotFoundError):
            asyncio.run(store.fetch("notes"))
        with pytest.raises(BadRequestError):
            asyncio.run(store.fetch("../secret"))


@pytest.fixture
def s3_root(local_root, monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem made for an earlier test's server
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="models")
    for adapter in local_root.iterdir():
        for file in adapter.iterdir():
            s3.upload_file(str(file), "models", f"lora/{adapter.name}/{file.name}")
    yield s3
    server.stop()


def test_s3_adapters_are_listed_and_downloaded_once(s3_root, tmp_path):
    store = AdapterStore(LoraConfig(dynamic_lora_loading_path="s3://models/lora/"), cache_dir=tmp_path / "cache")

    async def go():
        assert await store.names() == ["chat", "code", "sql", "wide"]
        first, second = await asyncio.gather(store.fetch("sql"), store.fetch("sql"))  # one download, shared
        return first, second

    first, second = asyncio.run(go())
    assert first == second
    assert json.loads(Path(first, "adapter_config.json").read_text())["r"] == 8
    s3_root.delete_object(Bucket="models", Key="lora/sql/adapter_config.json")
    assert asyncio.run(store.fetch("sql")) == first  # the node's copy is reused without asking the bucket
    with pytest.raises(ModelNotFoundError):
        asyncio.run(store.fetch("missing"))


def test_a_download_killed_mid_way_leaves_nothing_that_is_used_or_kept(s3_root, tmp_path):
    store = AdapterStore(LoraConfig(dynamic_lora_loading_path="s3://models/lora/"), cache_dir=tmp_path / "cache")
    first = Path(asyncio.run(store.fetch("chat")))
    # What a replica killed while downloading "sql" leaves: a partial folder, no finished one.
    sql_dir = Path(asyncio.run(store.fetch("sql"))).parent
    shutil.rmtree(sql_dir)
    (sql_dir / ".partial+killed").mkdir(parents=True)
    (sql_dir / ".partial+killed" / "adapter_config.json").write_text("{trunc")
    local_dir = asyncio.run(store.fetch("sql"))
    assert json.loads(Path(local_dir, "adapter_config.json").read_text())["r"] == 8
    assert not (sql_dir / ".partial+killed").exists()
    assert first.exists()  # another adapter's copy is not this download's to touch


def test_lru_keeps_at_most_n_and_never_evicts_one_in_use(local_root):
    engine = FakeEngine(type("Config", (), {"model_id": "base"})())
    store = AdapterStore(LoraConfig(dynamic_lora_loading_path=str(local_root)))
    adapters = LoadedAdapters("base", store, engine, capacity=2, max_rank=16)

    async def go():
        async with adapters.using("sql"):
            async with adapters.using("chat"):
                pass
            async with adapters.using("code"):  # chat is idle and least recent: it leaves, sql stays
                assert set(engine.adapters) == {"base:sql", "base:code"}
        async with adapters.using("chat"):
            pass
        with pytest.raises(BadRequestError, match="max_lora_rank"):
            async with adapters.using("wide"):
                pass

    asyncio.run(go())
    assert adapters.held == ["code", "chat"] and adapters.evictions == 2 and adapters.loads == 4
