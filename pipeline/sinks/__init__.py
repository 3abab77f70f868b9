"""Where results go: ClickHouse."""
