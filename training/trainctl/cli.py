def main() -> None:
    raise SystemExit("trainctl CLI: not built yet")
