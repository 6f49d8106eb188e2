"""agent/domain/pii.py: masking of personal details in review text, keyed pseudonyms of user ids."""

from __future__ import annotations

import pytest

from agent.domain.pii import mask_pii, pseudonymise


@pytest.mark.parametrize(("text", "expected"), [
    ("mail me: ann.b@x.co.uk now", "mail me: [email] now"),
    ("call +44 20 7946 0958 or (555) 123-4567", "call [phone] or [phone]"),
    ("tel: 020 7946 0958", "tel: [phone]"),
    ("ring 555-1234 after six", "ring [phone] after six"),
    ("mobile 07700900123", "mobile [phone]"),
    ("card 4111 1111 1111 1111 was charged", "card [card] was charged"),
    ("IBAN GB29 NWBK 6016 1331 9268 19 please", "IBAN [iban] please"),
])
def test_personal_details_are_masked(text: str, expected: str) -> None:
    assert mask_pii(text) == expected


@pytest.mark.parametrize("text", [
    "order 12345 arrived 2021-05-03, cost 12.99",
    "size 10 x 20 cm, 3 pack, 5/5 stars",
    "bought 2 in 2019 and again 2020-2021",
    "price 1,299.99 for SKU 85123A",
    "",
])
def test_ordinary_numbers_are_left_alone(text: str) -> None:
    assert mask_pii(text) == text


def test_pseudonyms_are_stable_keyed_and_opaque() -> None:
    a = pseudonymise("alice", b"k1")
    assert a == pseudonymise("alice", b"k1") and a.startswith("p_") and len(a) == 34
    assert a != pseudonymise("alice", b"k2") and a != pseudonymise("bob", b"k1")
    assert "alice" not in a
    with pytest.raises(ValueError):
        pseudonymise("alice", b"")
