"""A provider's form is encoded byte for byte as `urllib.parse.urlencode` encodes it."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from hypothesis import given
from hypothesis import strategies as st

from services.dispatcher.channels.http import form_encoded

texts = st.text(st.characters(codec="utf-8"), max_size=40) | st.text(
    st.characters(max_codepoint=127), max_size=40
)


@given(st.dictionaries(texts, texts, max_size=6))
def test_a_form_is_encoded_as_urlencode_encodes_it(form: dict[str, str]) -> None:
    encoded = form_encoded(form)

    assert encoded == urlencode(form).encode()
    assert dict(parse_qsl(encoded.decode(), keep_blank_values=True)) == form


def test_an_sms_form_keeps_its_safe_characters_and_escapes_the_rest() -> None:
    form = {
        "To": "+15555550123",
        "Body": "Hi Zoë, 50% off ~today_only. Reply STOP",
        "StatusCallback": "https://go.example/v1/sms/status/eyJj.ab-c_d",
    }

    assert form_encoded(form) == (
        b"To=%2B15555550123&Body=Hi+Zo%C3%AB%2C+50%25+off+~today_only.+Reply+STOP"
        b"&StatusCallback=https%3A%2F%2Fgo.example%2Fv1%2Fsms%2Fstatus%2FeyJj.ab-c_d"
    )
