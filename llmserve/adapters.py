"""Where LoRA adapters come from: a folder per adapter under one path.

``lora_config.dynamic_lora_loading_path`` is ``s3://bucket/prefix``,
``gs://bucket/prefix``, ``file:///dir`` or a plain directory; adapter ``name``
is the peft folder ``PATH/name``. A remote adapter is mirrored once per node
(``storage.FolderMirror``: fsspec, the standard credential variables, one
download under a lock, never a partial copy); concurrent first requests in one
replica share one download.

Names are checked before any file or bucket is touched: a name is one path
segment of letters, digits, ``.``, ``_`` and ``-`` (not ``.`` or ``..``).

``LoadedAdapters`` is a replica's least-recently-used set of adapters loaded
into its engine.

Example::

    store = AdapterStore(config.lora_config)
    local_dir = await store.fetch("sql")     # PATH/sql, downloaded if remote
    async with LoadedAdapters("qwen", store, engine, capacity=16, max_rank=16).using("sql"):
        ...                                   # the engine answers "qwen:sql" meanwhile
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from llmserve.config import LoraConfig
from llmserve.errors import (
    BadRequestError,
    FolderMissingError,
    LLMServeError,
    ModelNotFoundError,
    ServiceUnavailableError,
    StorageError,
)
from llmserve.storage import FolderMirror, cache_root, filesystem, protocols

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ADAPTER_CONFIG = "adapter_config.json"


def check_adapter_name(name: str) -> str:
    """``name`` if it is one safe path segment; a 400 otherwise."""
    if not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise BadRequestError(
            f"Invalid adapter name {name!r}: use one path segment of letters, digits, '.', '_' and '-'.",
            param="model",
        )
    return name


class AdapterStore:
    """Lists and fetches the adapters under one ``dynamic_lora_loading_path``."""

    def __init__(self, lora_config: LoraConfig, cache_dir: Optional[Path] = None):
        self._config = lora_config
        self._root_url = lora_config.dynamic_lora_loading_path.rstrip("/")
        self._fs, self._root = filesystem(self._root_url)
        self._is_local = "file" in protocols(self._fs)
        self._cache = cache_dir or cache_root("adapters")
        self._fetching: dict[str, asyncio.Future] = {}

    async def names(self) -> list[str]:
        """The adapters found under the path (folders with an adapter_config.json)."""

        def list_names() -> list[str]:
            try:
                entries = self._fs.ls(self._root, detail=True)
            except FileNotFoundError:
                return []
            folders = [entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory"]
            return sorted(name for name in folders if ADAPTER_NAME.fullmatch(name) and self._fs.exists(self._remote(name, ADAPTER_CONFIG)))

        return await asyncio.to_thread(list_names)

    async def fetch(self, name: str) -> str:
        """A local directory holding adapter ``name``; 404 when there is none."""
        check_adapter_name(name)
        if self._is_local:
            path = self._remote(name)
            if not await asyncio.to_thread(self._fs.exists, self._remote(name, ADAPTER_CONFIG)):
                raise _not_found(name, self._root_url)
            return path
        pending = self._fetching.get(name)
        if pending is None:
            pending = self._fetching[name] = asyncio.ensure_future(self._download_with_retries(name))
            pending.add_done_callback(lambda _: self._fetching.pop(name, None))
        return await asyncio.shield(pending)

    def rank(self, local_dir: str) -> int:
        config = json.loads(Path(local_dir, ADAPTER_CONFIG).read_text())
        return int(config.get("r", 0))

    async def _download_with_retries(self, name: str) -> str:
        mirror = FolderMirror(self._remote_url(name), self._cache)
        tries = max(1, self._config.max_download_tries)
        for attempt in range(tries):
            try:
                # An adapter's files never change under its name: a finished copy is used without asking the bucket.
                download = asyncio.to_thread(mirror.mirror, recheck=False, required=ADAPTER_CONFIG)
                return (await asyncio.wait_for(download, self._config.download_timeout_s)).path
            except FolderMissingError as exc:
                raise _not_found(name, self._root_url) from exc
            except StorageError as exc:
                raise ServiceUnavailableError(f"Could not download adapter {name!r}: {exc}") from exc
            except LLMServeError:
                raise
            except Exception as exc:
                if attempt + 1 == tries:
                    raise ServiceUnavailableError(
                        f"Could not download adapter {name!r} from {self._root_url} after {tries} tries: {exc}"
                    ) from exc
                await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _remote(self, name: str, *parts: str) -> str:
        return "/".join([self._root, name, *parts])

    def _remote_url(self, name: str) -> str:
        return f"{self._root_url}/{name}"


def _not_found(name: str, root_url: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"There is no LoRA adapter {name!r} under {root_url}.", param="model")


class LoadedAdapters:
    """The adapters one replica holds in its engine: at most ``capacity``, least recently used leave first.

    An adapter serving a request is never evicted under it; when every held
    adapter is busy, one more is held until a request ends.
    """

    def __init__(self, base_model_id: str, store: AdapterStore, engine: Any, capacity: int, max_rank: int):
        self._base = base_model_id
        self._store = store
        self._engine = engine
        self._capacity = capacity
        self._max_rank = max_rank
        self._held: "OrderedDict[str, None]" = OrderedDict()
        self._in_use: Counter = Counter()
        self._loading: dict[str, asyncio.Future] = {}
        self.loads = 0
        self.evictions = 0

    @property
    def store(self) -> AdapterStore:
        return self._store

    @property
    def held(self) -> list[str]:
        return list(self._held)

    @contextlib.asynccontextmanager
    async def using(self, name: str) -> AsyncIterator[None]:
        """Hold adapter ``name`` loaded for the duration of one request."""
        await self._ensure_loaded(check_adapter_name(name))
        self._in_use[name] += 1
        try:
            yield
        finally:
            self._in_use[name] -= 1

    async def _ensure_loaded(self, name: str) -> None:
        if name in self._held:
            self._held.move_to_end(name)
            return
        pending = self._loading.get(name)
        if pending is None:
            pending = self._loading[name] = asyncio.ensure_future(self._load(name))
            pending.add_done_callback(lambda _: self._loading.pop(name, None))
        await asyncio.shield(pending)

    async def _load(self, name: str) -> None:
        local_dir = await self._store.fetch(name)
        rank = self._store.rank(local_dir)
        if rank > self._max_rank:
            raise BadRequestError(
                f"The LoRA adapter {name!r} has rank {rank}, above this model's lora_config.max_lora_rank "
                f"({self._max_rank}); raise max_lora_rank to serve it.",
                param="model",
            )
        await self._make_room()
        await self._engine.load_adapter(f"{self._base}:{name}", local_dir)
        self._held[name] = None
        self.loads += 1

    async def _make_room(self) -> None:
        while len(self._held) >= self._capacity:
            idle = next((name for name in self._held if self._in_use[name] == 0), None)
            if idle is None:
                return  # every held adapter is serving: hold one more for now
            del self._held[idle]
            self.evictions += 1
            await self._engine.unload_adapter(f"{self._base}:{idle}")
