"""enwik8/text8 loading on small generated corpora shaped like the real ones; the embedded corpus."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from longjax.data import corpora, embedded
from longjax.data.corpora import CorpusChecksumError, CorpusError, CorpusNotFoundError, load_corpus
from longjax.data.corpus import SPLITS

SMALL_SPLITS = (900, 50, 50)


def _text(name: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(corpora.CORPORA[name].alphabet, np.uint8)
    return rng.choice(alphabet, size=sum(SMALL_SPLITS)).tobytes()


def _zip(member: str, text: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, text)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(url, destination, *, timeout):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(corpora, "download_url", refuse)


@pytest.fixture
def small(monkeypatch):
    """Shrinks enwik8 and text8 to 1,000 characters with the digests of generated texts."""
    texts, archives = {}, {}
    for name in ("enwik8", "text8"):
        spec = corpora.CORPORA[name]
        texts[name] = _text(name)
        archives[name] = _zip(spec.member, texts[name])
        algorithm = spec.archive_digest[0]
        monkeypatch.setitem(
            corpora.CORPORA,
            name,
            dataclasses.replace(
                spec,
                splits=SMALL_SPLITS,
                content_sha1=hashlib.sha1(texts[name]).hexdigest(),
                archive_size=len(archives[name]),
                archive_digest=(algorithm, hashlib.new(algorithm, archives[name]).hexdigest()),
            ),
        )
    return texts, archives


def test_real_corpora_keep_the_standard_splits():
    for name in ("enwik8", "text8"):
        spec = corpora.CORPORA[name]
        assert spec.splits == (90_000_000, 5_000_000, 5_000_000)
        assert spec.length == 100_000_000
        assert spec.url == f"http://mattmahoney.net/dc/{name}.zip"
    assert len(corpora.CORPORA["enwik8"].alphabet) == 256
    assert corpora.CORPORA["text8"].alphabet == b" abcdefghijklmnopqrstuvwxyz"


@pytest.mark.parametrize("form", ["zip", "extracted"])
def test_enwik8_splits_in_file_order(small, tmp_path, form):
    texts, archives = small
    if form == "zip":
        (tmp_path / "enwik8.zip").write_bytes(archives["enwik8"])
    else:
        (tmp_path / "enwik8").write_bytes(texts["enwik8"])
    corpus = load_corpus("enwik8", tmp_path, download=False)
    assert corpus.vocab_size == 256
    assert [len(corpus.split(s)) for s in SPLITS] == list(SMALL_SPLITS)
    for part in (corpus.train, corpus.validation, corpus.test):
        assert part.dtype == np.uint8 and not part.flags.writeable
    joined = np.concatenate([corpus.train, corpus.validation, corpus.test])
    assert joined.tobytes() == texts["enwik8"]
    assert corpus.fingerprint == hashlib.sha1(texts["enwik8"]).hexdigest()


def test_text8_compact_alphabet_round_trips(small, tmp_path):
    texts, archives = small
    (tmp_path / "text8.zip").write_bytes(archives["text8"])
    corpus = load_corpus("text8", tmp_path, download=False)
    assert corpus.vocab_size == 27
    assert corpus.train.max() < 27
    text = texts["text8"]
    assert corpus.train[0] == corpus.alphabet.index(text[0])
    assert corpus.decode(corpus.test) == text[-50:].decode()
    spaces = np.frombuffer(text[:900], np.uint8) == ord(" ")
    np.testing.assert_array_equal(corpus.train == 0, spaces)


def test_data_dir_from_argument_env_or_default(monkeypatch, tmp_path):
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    assert corpora.resolve_data_dir() == Path("~/.cache/longjax/data").expanduser()
    monkeypatch.setenv(corpora.DATA_DIR_ENV, str(tmp_path / "env"))
    assert corpora.resolve_data_dir() == tmp_path / "env"
    assert corpora.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_data_dir_env_is_used_for_loading(small, monkeypatch, tmp_path):
    texts, _ = small
    (tmp_path / "text8").write_bytes(texts["text8"])
    monkeypatch.setenv(corpora.DATA_DIR_ENV, str(tmp_path))
    assert load_corpus("text8", download=False).validation.size == 50


def test_missing_file_names_file_and_directory(small, tmp_path):
    with pytest.raises(CorpusNotFoundError) as info:
        load_corpus("enwik8", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert "enwik8.zip" in message and str(tmp_path / "nowhere") in message
    assert "http://mattmahoney.net/dc/enwik8.zip" in message


def test_offline_download_fails_at_once_with_placement_hint(small, tmp_path):
    def offline(url, destination, *, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    with pytest.raises(CorpusNotFoundError) as info:
        load_corpus("text8", tmp_path, downloader=offline)
    message = str(info.value)
    assert "text8.zip" in message and str(tmp_path) in message and "name resolution" in message
    assert list(tmp_path.iterdir()) == []


def test_download_is_verified_and_atomic(small, monkeypatch, tmp_path):
    texts, archives = small
    calls = []

    def fake(url, destination, *, timeout):
        calls.append(url)
        destination.write_bytes(archives["enwik8"])

    # The default downloader is looked up at call time, so replacing the module function works.
    monkeypatch.setattr(corpora, "download_url", fake)
    corpus = load_corpus("enwik8", tmp_path / "data")
    assert calls == ["http://mattmahoney.net/dc/enwik8.zip"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["enwik8.zip"]
    assert corpus.train.tobytes() == texts["enwik8"][:900]
    # Present now: no second download.
    load_corpus("enwik8", tmp_path / "data")
    assert len(calls) == 1


def test_download_with_wrong_checksum_is_refused(small, tmp_path):
    _, archives = small
    tampered = bytearray(archives["enwik8"])
    tampered[-30] ^= 1

    def fake(url, destination, *, timeout):
        destination.write_bytes(bytes(tampered))

    with pytest.raises(CorpusChecksumError) as info:
        load_corpus("enwik8", tmp_path, downloader=fake)
    assert "sha256" in str(info.value) and "enwik8.zip" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_nothing(small, tmp_path):
    def cut(url, destination, *, timeout):
        destination.write_bytes(b"PK\x03\x04partial")
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(CorpusNotFoundError, match="connection reset"):
        load_corpus("text8", tmp_path, downloader=cut)
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_refused(small, tmp_path):
    texts, _ = small
    (tmp_path / "enwik8").write_bytes(texts["enwik8"][:-1])
    with pytest.raises(CorpusError, match="999 characters, expected 1,000"):
        load_corpus("enwik8", tmp_path, download=False)


def test_substituted_file_of_the_right_length_is_refused(small, tmp_path):
    (tmp_path / "enwik8").write_bytes(_text("enwik8", seed=1))
    with pytest.raises(CorpusError, match="SHA-1"):
        load_corpus("enwik8", tmp_path, download=False)


def test_bad_extracted_file_is_not_replaced_by_the_zip(small, tmp_path):
    texts, archives = small
    (tmp_path / "enwik8.zip").write_bytes(archives["enwik8"])
    (tmp_path / "enwik8").write_bytes(texts["enwik8"][:500])
    with pytest.raises(CorpusError, match=str(tmp_path / "enwik8") + " holds 500"):
        load_corpus("enwik8", tmp_path, download=False)


def test_text8_with_foreign_bytes_is_refused(small, monkeypatch, tmp_path):
    text = b"Ab" + _text("text8")[2:]
    monkeypatch.setitem(
        corpora.CORPORA,
        "text8",
        dataclasses.replace(corpora.CORPORA["text8"], content_sha1=hashlib.sha1(text).hexdigest()),
    )
    (tmp_path / "text8").write_bytes(text)
    with pytest.raises(CorpusError, match="b'A' at offset 0"):
        load_corpus("text8", tmp_path, download=False)


def test_zip_without_the_corpus_or_broken_is_refused(small, tmp_path):
    (tmp_path / "text8.zip").write_bytes(_zip("other.txt", b"x"))
    with pytest.raises(CorpusError, match="no member 'text8'"):
        load_corpus("text8", tmp_path, download=False)
    (tmp_path / "text8.zip").write_bytes(b"not a zip")
    with pytest.raises(CorpusError, match="not a valid zip"):
        load_corpus("text8", tmp_path, download=False)


def test_unknown_corpus_and_split_names():
    with pytest.raises(ValueError, match="name must be one of"):
        load_corpus("enwik9")
    corpus = load_corpus(corpora.EMBEDDED_CORPUS)
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.split("valid")


def test_embedded_corpus_is_deterministic_and_split_90_5_5():
    from pydoc_data.topics import topics

    corpus = load_corpus(corpora.EMBEDDED_CORPUS)
    again = embedded.load_embedded_corpus()
    assert corpus.fingerprint == again.fingerprint
    np.testing.assert_array_equal(corpus.train, again.train)
    total = sum(len(corpus.split(s)) for s in SPLITS)
    assert total > 400_000
    assert len(corpus.train) == int(0.9 * total) and len(corpus.validation) == int(0.05 * total)
    assert corpus.vocab_size == 256
    text = b"".join(corpus.split(s).tobytes() for s in SPLITS).decode()
    assert text == embedded.embedded_text().decode()
    assert text.startswith(min(topics) + "\n")
    for key in ("assert", "with"):
        assert topics[key].strip() in text
