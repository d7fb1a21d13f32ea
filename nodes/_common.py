"""Names every node module shares."""

CATEGORY = "StyleKit"


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}"
