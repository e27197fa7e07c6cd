def print_json(obj: object, **kwargs: object) -> None:
    """Print `obj` as strict JSON on stdout: a NaN or infinity is an error, never invalid JSON."""
    import json

    from edge_metastone.errors import EdgeMetastoneError

    try:
        text = json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        raise EdgeMetastoneError(f"the result holds a non-finite number ({e})") from None
    print(text)
