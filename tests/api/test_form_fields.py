"""Form keys a client may send that are not list indexes the server can read: a 422 naming the
field, never a 500 (str.isdigit() accepts "²" and 5,000-digit strings, which int() refuses)."""

import pytest
from fastapi.exceptions import RequestValidationError

from serve.api.form_fields import form_fields
from serve.api.videos import VideoCreateRequest


@pytest.mark.parametrize("index", ["²", "9" * 5000, "-1", "1.5"])
def test_an_unreadable_index_is_a_field_error(index):
    with pytest.raises(RequestValidationError) as caught:
        form_fields([(f"loras[{index}][name]", "style")], VideoCreateRequest)
    (error,) = caught.value.errors()
    assert error["loc"][:2] == ("body", "loras")


def test_indexed_keys_still_build_the_list():
    parts = [("loras[1][name]", "detail"), ("loras[0][name]", "style"), ("loras[0][scale]", "0.5")]
    assert form_fields(parts, VideoCreateRequest)["loras"] == [{"name": "style", "scale": "0.5"}, {"name": "detail"}]
