"""enwik8 and text8 with their standard splits, verified on every load, never substituted.

Both corpora are the files Matt Mahoney distributes (`enwik8.zip`, `text8.zip`),
100,000,000 characters each, split into the first 90M (train), the next 5M
(validation) and the last 5M (test). They are read from a data directory, as
the zip or as the extracted file (`enwik8`, `text8`), whichever is there.

Where the files come from and how they are checked:

* The data directory is the `data_dir` argument, else `$LONGJAX_DATA_DIR`,
  else `~/.cache/longjax/data`.
* A missing corpus is downloaded from mattmahoney.net when `download=True` and
  the network allows: into a temporary file beside the target, checked against
  the archive's published size and digest, then renamed into place, so a
  crash never leaves a half-written `enwik8.zip`. When the download cannot
  happen, loading fails at once with a message naming the file and the
  directory to put it in.
* Every load checks the corpus length (100,000,000) and the SHA-1 of the
  extracted text, so a truncated, re-encoded or different file is refused,
  however it got there.

Published digests used here (none invented):

* enwik8 text: SHA-1 57b8363b814821dc9d47aa4d41f58733519076b2, from Mahoney's
  table of the Large Text Compression Benchmark files (quoted in gluon-nlp's
  corpus loaders).
* enwik8.zip: SHA-256 547994d9...34bc, 36,445,475 bytes, from Hugging Face
  datasets' `enwik8` download checksums.
* text8 text: SHA-1 0dc3edebc970dcc96137e7deda4d9995af9d93de, and text8.zip:
  SHA-1 6c70299b93b7e1f927b42cd8f6ac1a31547c7a2e, from gluon-nlp's `Text8`
  loader (which downloads mattmahoney.net/dc/text8.zip); the zip's size,
  31,344,016 bytes, is the one TensorFlow's word2vec tutorial checks.

Tokens: enwik8 is bytes (vocabulary 256, token = byte). text8 holds only
' ' and 'a'-'z'; it is mapped to the compact alphabet ' abc...z' (vocabulary
27, ' ' = 0, 'a' = 1, ...). `Corpus.alphabet` is the decode table.

Tests shrink a corpus by replacing its entry in `CORPORA` (split sizes and
digests), and replace `download_url` so that nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from longjax.data import embedded
from longjax.data.corpus import Corpus, CorpusChecksumError, CorpusError, CorpusNotFoundError, make_corpus

# The one corpus that needs no file: see `embedded.py`.
EMBEDDED_CORPUS = embedded.NAME
DATA_DIR_ENV = "LONGJAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/longjax/data"
# Seconds without progress before a download is abandoned: an offline machine fails fast.
DOWNLOAD_TIMEOUT_S = 30.0

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """How one corpus is distributed and what it must look like."""

    name: str
    url: str  # canonical download location of `archive`
    archive: str  # the file as distributed
    member: str  # the corpus inside `archive`; also the name of the extracted file
    archive_size: int  # bytes of `archive`, checked on download
    archive_digest: tuple[str, str]  # (hashlib algorithm, hex digest) of `archive`
    content_sha1: str  # SHA-1 of the extracted corpus, checked on every load
    splits: tuple[int, int, int]  # characters in train, validation, test, in file order
    alphabet: bytes  # token i is the character alphabet[i]; no other byte may occur

    @property
    def length(self) -> int:
        return sum(self.splits)


CORPORA: dict[str, CorpusSpec] = {
    "enwik8": CorpusSpec(
        name="enwik8",
        url="http://mattmahoney.net/dc/enwik8.zip",
        archive="enwik8.zip",
        member="enwik8",
        archive_size=36_445_475,
        archive_digest=("sha256", "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"),
        content_sha1="57b8363b814821dc9d47aa4d41f58733519076b2",
        splits=(90_000_000, 5_000_000, 5_000_000),
        alphabet=bytes(range(256)),
    ),
    "text8": CorpusSpec(
        name="text8",
        url="http://mattmahoney.net/dc/text8.zip",
        archive="text8.zip",
        member="text8",
        archive_size=31_344_016,
        archive_digest=("sha1", "6c70299b93b7e1f927b42cd8f6ac1a31547c7a2e"),
        content_sha1="0dc3edebc970dcc96137e7deda4d9995af9d93de",
        splits=(90_000_000, 5_000_000, 5_000_000),
        alphabet=b" abcdefghijklmnopqrstuvwxyz",
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir`, else `$LONGJAX_DATA_DIR`, else `~/.cache/longjax/data`, with `~` expanded."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def download_url(url: str, destination: Path, *, timeout: float) -> None:
    """Writes the body of `url` to `destination`. Tests replace this function."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _placement_hint(spec: CorpusSpec, directory: Path) -> str:
    return (
        f"put {spec.archive} (from {spec.url}) or the extracted file {spec.member} into "
        f"{directory} (the data directory: argument data_dir, else ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR})"
    )


def fetch_archive(
    spec: CorpusSpec, directory: Path, *, downloader: Callable[..., None] | None = None
) -> Path:
    """Downloads `spec.archive` into `directory`, verified, written atomically; returns its path.

    Raises:
      OSError, http.client.HTTPException: the download failed (network unreachable, HTTP
        error, connection cut).
      CorpusChecksumError: the download does not match the published size or digest;
        nothing is written.
    """
    downloader = downloader or download_url
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / spec.archive
    handle, partial = tempfile.mkstemp(prefix=f".{spec.archive}.", suffix=".part", dir=directory)
    os.close(handle)
    partial = Path(partial)
    try:
        _log.info("downloading %s to %s", spec.url, target)
        downloader(spec.url, partial, timeout=DOWNLOAD_TIMEOUT_S)
        size = partial.stat().st_size
        algorithm, expected = spec.archive_digest
        actual = _file_digest(partial, algorithm)
        if size != spec.archive_size or actual != expected:
            raise CorpusChecksumError(
                f"the download of {spec.url} is not the published {spec.archive}: {size:,} bytes, "
                f"{algorithm} {actual}; expected {spec.archive_size:,} bytes, {algorithm} {expected}. "
                f"Nothing was written; {_placement_hint(spec, directory)}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _read_text(spec: CorpusSpec, path: Path) -> bytes:
    if path.name == spec.member:
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if spec.member not in names:
                raise CorpusError(f"{path} has no member {spec.member!r} (it holds {names[:5]})")
            return archive.read(spec.member)
    except zipfile.BadZipFile as e:
        raise CorpusError(f"{path} is not a valid zip archive ({e}); replace it with {spec.url}") from e


def load_corpus(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    downloader: Callable[..., None] | None = None,
) -> Corpus:
    """Loads a corpus with its standard splits, verified.

    Args:
      name: 'enwik8', 'text8', or 'pydoc_topics' (the embedded demo corpus; no file needed).
      data_dir: directory holding `<name>.zip` or the extracted `<name>`; default
        `$LONGJAX_DATA_DIR`, else `~/.cache/longjax/data`.
      download: fetch the archive from its canonical location when it is missing.
      downloader: `fn(url, destination_path, *, timeout)`; default `download_url`.

    Returns:
      A `Corpus` whose splits are uint8 token ids `[chars]`.

    Raises:
      CorpusNotFoundError: the corpus is missing and could not be downloaded; the message
        says which file to put where.
      CorpusError: the file is there but is not the distributed corpus (length, digest,
        alphabet, zip member).
    """
    if name == EMBEDDED_CORPUS:
        return embedded.load_embedded_corpus()
    if name not in CORPORA:
        raise ValueError(f"name must be one of {sorted(CORPORA) + [EMBEDDED_CORPUS]}, got {name!r}")
    spec = CORPORA[name]
    directory = resolve_data_dir(data_dir)
    candidates = [directory / spec.member, directory / spec.archive]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if not download:
            raise CorpusNotFoundError(
                f"{name} not found (download=False): {_placement_hint(spec, directory)}"
            )
        try:
            path = fetch_archive(spec, directory, downloader=downloader)
        except (OSError, http.client.HTTPException) as e:
            raise CorpusNotFoundError(
                f"{name} not found and downloading {spec.url} failed ({e}): "
                f"{_placement_hint(spec, directory)}"
            ) from e
    text = _read_text(spec, path)
    corpus = make_corpus(name, text, spec.splits, spec.alphabet, source=str(path))
    if corpus.fingerprint != spec.content_sha1:
        raise CorpusError(
            f"{path} has the right length but SHA-1 {corpus.fingerprint}, not the published "
            f"{spec.content_sha1}: it is not the distributed {name}; replace it with {spec.url}"
        )
    return corpus
