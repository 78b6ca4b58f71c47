"""The offline rehearsal: the whole recovery flow on one machine (`trainctl rehearse`).

moto stands in for AWS (provisioned from the synthesized CDK stack), local processes
running the real agent stand in for instances, and the real handlers and resume
workflow do the recovering. See docs/REHEARSE.md.
"""
