"""Tokens: signing, age, tampering, rotation (pure unit tests)."""

from __future__ import annotations

import hashlib
import time

import pytest

from core.errors import InvalidToken
from sessions.tokens import TokenSigner, new_session_id

pytestmark = pytest.mark.unit


def code_of(signer: TokenSigner, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        signer.verify(token)
    return caught.value.code


def test_issue_and_verify() -> None:
    signer = TokenSigner(["key-one-0123456789"], max_age_seconds=60)
    session_id = new_session_id()
    verified = signer.verify(signer.issue(session_id))
    assert verified.session_id == session_id and abs(verified.issued_at - time.time()) < 5


def test_session_ids_are_128_bit_random() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_tampered_foreign_malformed_and_expired_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    signer = TokenSigner(["key-one-0123456789"], max_age_seconds=1)
    token = signer.issue(new_session_id())
    payload, stamp, signature = token.split(".")
    assert code_of(signer, f"{payload}x.{stamp}.{signature}") == "invalid_signature"
    assert code_of(signer, TokenSigner(["other-key-0123456789"], 60).issue(new_session_id())) == "invalid_signature"
    assert code_of(signer, "no-dots-here") == "malformed_token"
    assert code_of(signer, "a.b.c d") == "malformed_token"
    wrong_payload = TokenSigner(["key-one-0123456789"], 60)._serializer.dumps({"sid": 1})
    assert code_of(signer, wrong_payload) == "malformed_token"
    later = time.time() + 2.1  # the clock moves on instead of the test sleeping
    monkeypatch.setattr(time, "time", lambda: later)
    assert code_of(signer, token) == "token_expired"


def test_rotation_newest_signs_all_verify() -> None:
    old = TokenSigner(["old-key-0123456789"], 60)
    rotated = TokenSigner(["new-key-0123456789", "old-key-0123456789"], 60)
    new_only = TokenSigner(["new-key-0123456789"], 60)
    old_token, new_token = old.issue(new_session_id()), rotated.issue(new_session_id())
    assert rotated.verify(old_token) and new_only.verify(new_token)
    assert code_of(old, new_token) == "invalid_signature"


def test_session_ref_is_keyed_and_follows_rotation() -> None:
    session_id = new_session_id()
    old = TokenSigner(["old-key-0123456789"], 60)
    rotated = TokenSigner(["new-key-0123456789", "old-key-0123456789"], 60)
    ref = old.session_ref(session_id)
    assert len(ref) == 16 and int(ref, 16) >= 0
    # Keyed: neither a plain hash of the id nor the same under another secret.
    assert ref not in hashlib.sha256(session_id.encode()).hexdigest()
    assert rotated.session_ref(session_id) != ref
    # Data named before a rotation is still found under the old key's name.
    assert rotated.session_refs(session_id) == [rotated.session_ref(session_id), ref]
    assert old.session_ref(new_session_id()) != ref
