"""Folders mirrored from object storage (a local moto S3 server), without Ray."""

import concurrent.futures
import json
from pathlib import Path

import pytest
import s3fs

from llmserve.errors import FolderMissingError, StorageError
from llmserve.storage import FolderMirror
from tests.e2e.conftest import local_s3, s3_requests

FILES = {"config.json": b'{"layers": 2}', "model.safetensors": b"w" * 300_000, "tokenizer/vocab.txt": b"a\nb\n"}


@pytest.fixture
def bucket(monkeypatch):
    with local_s3() as (credentials, s3):
        for key, value in credentials.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credentials must fail at once, not probe a cloud
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem made for an earlier test's server
        s3.create_bucket(Bucket="weights")
        for name, data in FILES.items():
            s3.put_object(Bucket="weights", Key=f"tiny/{name}", Body=data)
        yield s3


def object_gets(requests: list[str]) -> list[str]:
    return sorted(line.split(" ", 1)[1] for line in requests if line.startswith("GET /weights/tiny/"))


def test_replicas_mirroring_together_download_each_file_once(bucket, tmp_path):
    with s3_requests() as requests:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two replicas of one node, one cache
            copies = list(pool.map(lambda _: FolderMirror("s3://weights/tiny", tmp_path).mirror(), range(2)))
    assert object_gets(requests) == sorted(f"/weights/tiny/{name}" for name in FILES)
    assert copies[0].path == copies[1].path
    assert sorted(copy.fetched_bytes for copy in copies) == [0, sum(map(len, FILES.values()))]
    for name, data in FILES.items():
        assert Path(copies[0].path, name).read_bytes() == data


def test_unchanged_files_are_not_fetched_again_and_changed_ones_are(bucket, tmp_path):
    first = FolderMirror("s3://weights/tiny", tmp_path).mirror()
    with s3_requests() as requests:
        again = FolderMirror("s3://weights/tiny", tmp_path).mirror()
    assert (again.path, again.fetched_files, object_gets(requests)) == (first.path, 0, [])

    bucket.put_object(Bucket="weights", Key="tiny/config.json", Body=b'{"layers": 3}')
    with s3_requests() as requests:
        updated = FolderMirror("s3://weights/tiny", tmp_path).mirror()
    assert object_gets(requests) == ["/weights/tiny/config.json"]
    assert (updated.fetched_files, updated.linked_files) == (1, 2)
    assert Path(updated.path, "config.json").read_bytes() == b'{"layers": 3}'
    assert Path(first.path, "config.json").read_bytes() == b'{"layers": 2}'  # a replica loading the old copy keeps it


def test_a_download_killed_mid_way_is_never_used_and_is_cleared(bucket, tmp_path):
    mirror = FolderMirror("s3://weights/tiny", tmp_path)
    partial = mirror._dir / ".partial+killed"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{trunc")
    copy = mirror.mirror()
    assert Path(copy.path, "config.json").read_bytes() == FILES["config.json"]
    assert copy.fetched_files == len(FILES) and not partial.exists()


def test_progress_reaches_the_total(bucket, tmp_path):
    seen = []
    FolderMirror("s3://weights/tiny", tmp_path).mirror(progress=lambda done, total: seen.append((done, total)))
    total = sum(map(len, FILES.values()))
    assert seen[-1] == (total, total)


def test_a_missing_bucket_prefix_or_credentials_says_which(bucket, tmp_path, monkeypatch):
    with pytest.raises(FolderMissingError, match="bucket 'nowhere' does not exist"):
        FolderMirror("s3://nowhere/tiny", tmp_path).mirror()
    with pytest.raises(FolderMissingError, match="no files under this prefix"):
        FolderMirror("s3://weights/typo", tmp_path).mirror()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.aws either
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match=r"no credentials found .*s3://anonymous@weights/tiny"):
        FolderMirror("s3://weights/tiny", tmp_path).mirror()
    with pytest.raises(StorageError, match="access denied"):  # a private bucket, read unsigned
        FolderMirror("s3://anonymous@weights/tiny", tmp_path).mirror()
    for name in FILES:
        bucket.put_object_acl(Bucket="weights", Key=f"tiny/{name}", ACL="public-read")
    copy = FolderMirror("s3://anonymous@weights/tiny", tmp_path).mirror()  # unsigned, as for a public bucket
    assert json.loads(Path(copy.path, "config.json").read_text()) == {"layers": 2}
