"""cdk-nag acknowledgements, one resource at a time and always with a reason.

cdk-nag 3 uses CDK's native `Validations.of(construct).acknowledge(...)`. Findings that
name a value (IAM5 wildcards, IAM4 managed policies) embed it as cdk-nag renders it:
`Ref`/`Fn::GetAtt` become `<Name>`/`<Logical.Attr>` and `Fn::Join` is flattened. So ids
are built here from the same tokens the resources use, which keeps them right for both an
env-agnostic and an explicit-env synth.
"""

from __future__ import annotations

from typing import Any

from aws_cdk import Acknowledgment, Stack, Validations
from constructs import IConstruct


def render(scope: IConstruct, value: str) -> str:
    """Render a (possibly tokenised) string the way cdk-nag prints it in a finding id."""
    return _flatten(Stack.of(scope).resolve(value))


def _flatten(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((key, arg),) = node.items()
        if key == "Ref":
            return f"<{arg}>"
        if key == "Fn::GetAtt":
            return f"<{'.'.join(arg)}>"
        if key == "Fn::Join":
            separator, parts = arg
            return str(separator).join(_flatten(p) for p in parts)
    raise ValueError(f"cannot render {node!r} as a cdk-nag finding id")


def acknowledge(scope: IConstruct, rule: str, reason: str, *findings: str) -> None:
    """Acknowledge `rule` on `scope` (and its children), once per finding if given.

    `findings` are the bracketed parts of finding ids, e.g. `Resource::*`; tokenised values
    inside them are rendered with `render` first.
    """
    ids = [f"{rule}[{render(scope, f)}]" for f in findings] if findings else [rule]
    Validations.of(scope).acknowledge(*(Acknowledgment(id=i, reason=reason) for i in ids))
