import vlmkit


def test_every_public_name_resolves():
    for name in vlmkit.__all__:
        assert callable(getattr(vlmkit, name)), name


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        vlmkit.no_such_thing
