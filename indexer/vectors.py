"""Vector stores behind one interface: local FAISS (the default) or a Milvus cluster.

A store holds three collections of L2-normalised vectors, each row tied to a photo:

    global    id = photo id                 one CLS vector per photo
    patches   id = photo id * g^2 + cell    the patch grid
    objects   id = photo id * 256 + rank    SAM objects' crops

and the photos' class tags, so searches can be filtered by tag inside the store
(Milvus evaluates ``array_contains(tags, ...)`` next to the vectors).

    open_store("faiss:///path/dir")                  FAISS files in a directory
    open_store("milvus://host:19530/photos")         a Milvus server, collections photos_global, ...
    open_store("milvus-lite:///path/photos.db")      Milvus Lite: the same engine embedded (tests, laptops)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import faiss
import numpy as np

from indexer.errors import ConfigError
from indexer.faissio import GLOBAL_FLAT_MAX, HNSW_M, PATCH_SQ8_MAX

KINDS = ("global", "patches", "objects")
MAX_TAGS = 16
# Milvus index kinds by collection size, as the FAISS segments choose theirs (faissio.choose_kind / seal_kind):
# exact (FLAT) while small, then HNSW for global and object vectors, IVF over 8-bit codes (nlist ~ sqrt n) for
# patches. Milvus Lite builds FLAT, IVF_FLAT, IVF_SQ8, HNSW, HNSW_SQ and AUTOINDEX (IVF_PQ is accepted at
# creation but fails to build), so these all run on Lite as on a server. Module constants: tests lower them.
MILVUS_FLAT_MAX = {"global": GLOBAL_FLAT_MAX, "objects": GLOBAL_FLAT_MAX, "patches": PATCH_SQ8_MAX}
KIND_PROPERTY = "dinosearch_index"  # collection property naming its index kind (milvus_index's name)
MILVUS_HNSW_EF = 128  # candidates an HNSW search keeps (as the FAISS HNSW segments)
MILVUS_NPROBE = 32  # IVF lists a search visits


def milvus_index(kind: str, n: int) -> tuple[str, str, dict]:
    """(name, Milvus index type, build params) for a collection of ``kind`` holding n vectors. The name says the
    kind and its parameters; it is kept in a collection property (describe_index does not return the params),
    so `info` and `verify` read the kind back from the collection itself."""
    if n <= MILVUS_FLAT_MAX[kind]:
        return "FLAT", "FLAT", {}
    if kind == "patches":
        nlist = 1 << max(4, round(math.log2(math.sqrt(n))))
        return f"IVF_SQ8_nlist{nlist}", "IVF_SQ8", {"nlist": nlist}
    return f"HNSW_M{HNSW_M}", "HNSW", {"M": HNSW_M, "efConstruction": 200}


def kinds_agree(have: str, want: str) -> bool:
    """Whether a collection's index kind is the one its size calls for (an IVF's list count within 4x of it:
    rebuilt only when the data has grown or shrunk that much, not at every commit)."""
    ivf = "IVF_SQ8_nlist"
    if have.startswith(ivf) and want.startswith(ivf):
        return 0.25 < int(have[len(ivf):]) / int(want[len(ivf):]) < 4
    return have == want


class VectorStore(Protocol):
    dim: int

    def add(self, kind: str, ids: np.ndarray, photos: np.ndarray, vectors: np.ndarray) -> None: ...
    def remove_photos(self, photo_ids: Iterable[int], kinds: Iterable[str] = KINDS) -> None: ...
    def clear(self, kind: str) -> None: ...
    def remove_from(self, first_photo: int) -> int: ...
    def photo_ids(self, kind: str) -> np.ndarray: ...
    def set_tags(self, photo_ids: Iterable[int], tags: list[list[str]]) -> None: ...
    def search(self, kind: str, xq: np.ndarray, k: int, *, photos: Iterable[int] | None = None,
               tag: str | None = None) -> tuple[np.ndarray, np.ndarray]: ...
    def get(self, kind: str, ids: np.ndarray) -> np.ndarray: ...
    def count(self, kind: str) -> int: ...
    def flush(self) -> None: ...
    def index_kind(self, kind: str) -> str: ...
    def wanted_kind(self, kind: str) -> str: ...
    def fit_index(self, kind: str) -> bool: ...


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown vector collection {kind!r}; expected one of {', '.join(KINDS)}")


class FaissStore:
    """FAISS indexes (exact inner product) with photo and tag maps; saved as files in a directory."""

    def __init__(self, path: str | os.PathLike, dim: int):
        self.path, self.dim = Path(path).expanduser(), dim
        self.index: dict[str, faiss.Index] = {}
        self.photo: dict[str, dict[int, int]] = {}
        self.tags: dict[int, list[str]] = {}
        for kind in KINDS:
            f = self.path / f"{kind}.faiss"
            self.index[kind] = faiss.read_index(str(f)) if f.is_file() else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            m = self.path / f"{kind}.photos.npy"
            self.photo[kind] = dict(np.load(m).tolist()) if m.is_file() else {}
        t = self.path / "tags.json"
        if t.is_file():
            self.tags = {int(k): v for k, v in json.loads(t.read_text()).items()}

    def add(self, kind, ids, photos, vectors) -> None:
        _check_kind(kind)
        ids = np.asarray(ids, np.int64)
        self.index[kind].remove_ids(faiss.IDSelectorBatch(ids))  # upsert
        self.index[kind].add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
        self.photo[kind].update(zip(ids.tolist(), np.asarray(photos, np.int64).tolist()))

    def remove_photos(self, photo_ids, kinds=KINDS) -> None:
        gone = {int(p) for p in photo_ids}
        for kind in kinds:
            ids = [i for i, p in self.photo[kind].items() if p in gone]
            if ids:
                self.index[kind].remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
                for i in ids:
                    del self.photo[kind][i]
        if "global" in kinds:
            for p in gone:
                self.tags.pop(p, None)

    def clear(self, kind) -> None:
        _check_kind(kind)
        self.index[kind] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.photo[kind] = {}

    def remove_from(self, first_photo) -> int:
        """Remove the vectors of every photo with id >= first_photo; returns how many vectors went."""
        gone = {p for kind in KINDS for p in self.photo[kind].values() if p >= first_photo}
        n = sum(p in gone for kind in KINDS for p in self.photo[kind].values())
        self.remove_photos(gone)
        return n

    def photo_ids(self, kind) -> np.ndarray:
        _check_kind(kind)
        return np.unique(np.fromiter(self.photo[kind].values(), np.int64, len(self.photo[kind])))

    def set_tags(self, photo_ids, tags) -> None:
        for p, t in zip(photo_ids, tags):
            self.tags[int(p)] = list(t)[:MAX_TAGS]

    def search(self, kind, xq, k, *, photos=None, tag=None):
        _check_kind(kind)
        xq = np.ascontiguousarray(np.atleast_2d(xq), np.float32)
        allowed = None if photos is None else {int(p) for p in photos}
        if tag is not None:
            tagged = {p for p, t in self.tags.items() if tag in t}
            allowed = tagged if allowed is None else allowed & tagged
        params = None
        if allowed is not None:
            ids = [i for i, p in self.photo[kind].items() if p in allowed]
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
        n = self.index[kind].ntotal
        if n == 0 or k <= 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        D, I = self.index[kind].search(xq, min(k, n), params=params)
        return D, I

    def get(self, kind, ids) -> np.ndarray:
        _check_kind(kind)
        return self.index[kind].reconstruct_batch(np.asarray(ids, np.int64))

    def count(self, kind) -> int:
        _check_kind(kind)
        return int(self.index[kind].ntotal)

    def index_kind(self, kind) -> str:
        """Always exact: the FAISS store is the simple reference store (the index's own segments choose kinds)."""
        _check_kind(kind)
        return "Flat"

    wanted_kind = index_kind

    def fit_index(self, kind) -> bool:
        return False

    def flush(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            faiss.write_index(self.index[kind], str(self.path / f"{kind}.faiss"))
            np.save(self.path / f"{kind}.photos.npy", np.array(sorted(self.photo[kind].items()), np.int64).reshape(-1, 2))
        (self.path / "tags.json").write_text(json.dumps({str(k): v for k, v in self.tags.items()}))


class MilvusStore:
    """The same collections in Milvus (a server, or Milvus Lite embedded), through pymilvus' MilvusClient."""

    def __init__(self, uri: str, name: str, dim: int):
        try:
            from pymilvus import DataType, MilvusClient
        except ImportError:
            raise ConfigError("the Milvus store needs pymilvus: pip install 'dinosearch[scale]'") from None
        self.dim, self.name = dim, name
        try:
            self.client = MilvusClient(uri=uri)
        except Exception as e:  # pymilvus raises its own exception types for unreachable servers
            raise ConfigError(f"cannot reach Milvus at {uri}: {str(e).splitlines()[0][:200]}") from None
        for kind in KINDS:
            coll = self._coll(kind)
            if self.client.has_collection(coll):
                self.client.load_collection(coll)  # a collection from another process starts released
                continue
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("photo", DataType.INT64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("tags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_TAGS, max_length=256)
            self.client.create_collection(coll, schema=schema, index_params=self._index_params(kind, 0), consistency_level="Strong")
            self._record_kind(kind, 0)
        self.kinds = {kind: self.index_kind(kind) for kind in KINDS}

    def _coll(self, kind: str) -> str:
        _check_kind(kind)
        return f"{self.name}_{kind}"

    def _index_params(self, kind: str, n: int):
        _, index_type, params = milvus_index(kind, n)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
        return index

    def _record_kind(self, kind: str, n: int) -> None:
        """Keep the kind's name in a collection property: describe_index gives the type, not its parameters."""
        self.client.alter_collection_properties(self._coll(kind), properties={KIND_PROPERTY: milvus_index(kind, n)[0]})

    def index_kind(self, kind) -> str:
        """The kind of the collection's vector index, as milvus_index names it (recorded in the collection when it
        was built; a collection from before has only its index type)."""
        coll = self._coll(kind)
        named = (self.client.describe_collection(coll).get("properties") or {}).get(KIND_PROPERTY)
        if named:
            return str(named)
        names = self.client.list_indexes(coll)
        return str(self.client.describe_index(coll, names[0])["index_type"]) if names else "none"

    def wanted_kind(self, kind) -> str:
        """The kind the collection's size calls for."""
        return milvus_index(kind, self.count(kind))[0]

    def fit_index(self, kind) -> bool:
        """Rebuild the collection's index when its size calls for another kind (a threshold crossed, or an IVF's
        list count off by 4x or more: nlist grows with the data); True if it was rebuilt."""
        if kinds_agree(self.index_kind(kind), self.wanted_kind(kind)):
            return False
        coll = self._coll(kind)
        self.client.release_collection(coll)
        for name in self.client.list_indexes(coll):
            self.client.drop_index(coll, name)
        n = self.count(kind)
        self.client.create_index(coll, self._index_params(kind, n))
        self._record_kind(kind, n)
        self.client.load_collection(coll)
        self.kinds[kind] = self.index_kind(kind)
        return True

    def _tags_of(self, photos: np.ndarray) -> dict[int, list[str]]:
        uniq = sorted({int(p) for p in photos})
        if not uniq:
            return {}
        rows = self.client.query(self._coll("global"), filter=f"id in {uniq}", output_fields=["id", "tags"])
        return {int(r["id"]): list(r["tags"] or []) for r in rows}

    def add(self, kind, ids, photos, vectors) -> None:
        ids, photos = np.asarray(ids, np.int64), np.asarray(photos, np.int64)
        tags = self._tags_of(photos) if kind != "global" else {}
        rows = [{"id": int(i), "photo": int(p), "vector": v.astype(np.float32).tolist(), "tags": tags.get(int(p), [])}
                for i, p, v in zip(ids, photos, np.asarray(vectors, np.float32))]
        for i in range(0, len(rows), 2000):
            self.client.upsert(self._coll(kind), rows[i:i + 2000])

    def remove_photos(self, photo_ids, kinds=KINDS) -> None:
        ids = sorted({int(p) for p in photo_ids})
        if ids:
            for kind in kinds:
                self.client.delete(self._coll(kind), filter=f"photo in {ids}")

    def clear(self, kind) -> None:
        self.client.delete(self._coll(kind), filter="photo >= 0")

    def remove_from(self, first_photo) -> int:
        n = 0
        for kind in KINDS:
            r = self.client.delete(self._coll(kind), filter=f"photo >= {int(first_photo)}")
            n += int(r["delete_count"]) if isinstance(r, dict) else len(r)  # a count from a server, the keys from Milvus Lite
        return n

    def photo_ids(self, kind) -> np.ndarray:
        it = self.client.query_iterator(self._coll(kind), batch_size=16384, filter="photo >= 0", output_fields=["photo"])
        found: set[int] = set()
        while rows := it.next():
            found.update(int(r["photo"]) for r in rows)
        it.close()
        return np.array(sorted(found), np.int64)

    def set_tags(self, photo_ids, tags) -> None:
        want = {int(p): list(t)[:MAX_TAGS] for p, t in zip(photo_ids, tags)}
        if not want:
            return
        for kind in ("global", "objects"):  # patches are filtered through their photos' candidates
            rows = self.client.query(self._coll(kind), filter=f"photo in {sorted(want)}", output_fields=["id", "photo", "vector", "tags"])
            for r in rows:
                r["tags"] = want[int(r["photo"])]
                r["vector"] = [float(x) for x in r["vector"]]
            if rows:
                self.client.upsert(self._coll(kind), rows)

    def search(self, kind, xq, k, *, photos=None, tag=None):
        xq = np.atleast_2d(np.asarray(xq, np.float32))
        filters = []
        if photos is not None:
            filters.append(f"photo in {sorted({int(p) for p in photos})}")
        if tag is not None:
            if kind == "patches":
                raise ConfigError("tag filters on patch vectors go through photos=, not tag=")
            filters.append(f"array_contains(tags, {json.dumps(tag)})")
        if k <= 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        params = {"ef": max(MILVUS_HNSW_EF, int(k))} if self.kinds[kind].startswith("HNSW") else (
            {"nprobe": MILVUS_NPROBE} if self.kinds[kind].startswith("IVF") else {})
        res = self.client.search(self._coll(kind), data=[q.tolist() for q in xq], limit=int(k), filter=" and ".join(filters),
                                 output_fields=["photo"], search_params={"metric_type": "IP", "params": params})
        width = max((len(r) for r in res), default=0)
        D = np.full((len(xq), width), -np.inf, np.float32)
        I = np.full((len(xq), width), -1, np.int64)
        for q, hits in enumerate(res):
            for j, h in enumerate(hits):
                D[q, j], I[q, j] = h["distance"], h["id"]
        return D, I

    def get(self, kind, ids) -> np.ndarray:
        ids = [int(i) for i in ids]
        rows = {int(r["id"]): r["vector"] for r in self.client.query(self._coll(kind), filter=f"id in {ids}", output_fields=["id", "vector"])}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"ids not in {self._coll(kind)}: {missing[:5]}")
        return np.asarray([rows[i] for i in ids], np.float32)

    def count(self, kind) -> int:
        rows = self.client.query(self._coll(kind), filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def flush(self) -> None:
        """Make every write durable, then give each collection the index kind its size calls for (at a commit,
        never per add)."""
        for kind in KINDS:
            self.client.flush(self._coll(kind))
            self.fit_index(kind)


def open_store(uri: str, dim: int) -> VectorStore:
    """A vector store by URI: faiss:///dir, milvus://host:port/name, milvus-lite:///path/file.db[?name=photos]."""
    u = urlparse(uri)
    if u.scheme == "faiss":
        return FaissStore(u.path, dim)
    if u.scheme == "milvus":
        name = u.path.strip("/") or "dinosearch"
        if not u.hostname:
            raise ConfigError(f"milvus store URI needs a host: milvus://HOST:19530/NAME, got {uri!r}")
        return MilvusStore(f"http://{u.hostname}:{u.port or 19530}", name.replace("/", "_"), dim)
    if u.scheme == "milvus-lite":
        name = dict(p.split("=", 1) for p in u.query.split("&") if "=" in p).get("name", "dinosearch")
        Path(u.path).parent.mkdir(parents=True, exist_ok=True)
        return MilvusStore(u.path, name, dim)
    raise ConfigError(f"unknown store {uri!r}: use faiss:///DIR, milvus://HOST:19530/NAME or milvus-lite:///PATH.db")
