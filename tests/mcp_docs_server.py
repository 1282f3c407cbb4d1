"""A small MCP server over stdio for the host-tool tests: one documentation search tool."""

from __future__ import annotations

from mcp.server.fastmcp import FastMCP

server = FastMCP("docs")


@server.tool()
def search_docs(query: str) -> str:
    """Search the documentation."""
    return f"2 documents about {query}"


if __name__ == "__main__":
    server.run()
