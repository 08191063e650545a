"""Write world-110m.svg, the dashboard's map, from world-atlas's countries-110m.json.

world-atlas 2.0.2 (npm, ISC licence) is Natural Earth's 1:110m countries (public domain) as
TopoJSON. The SVG is the equirectangular projection (x = lon + 180, y = 90 - lat, in degrees)
cut at 60°S, one path of every country outline: the dashboard draws regions on it in the same
coordinates.

    npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    python skybroker/static/make_world.py package/countries-110m.json skybroker/static/world-110m.svg
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

SOUTH = -60.0  # Antarctica left out: no region, no user there
HEIGHT = 90.0 - SOUTH


def decode_arcs(topo: dict) -> list[list[tuple[float, float]]]:
    """The arcs as (lon, lat) points: delta-decoded, de-quantized."""
    (sx, sy), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            pts.append((x * sx + tx, y * sy + ty))
        arcs.append(pts)
    return arcs


def ring(arcs: list[list[tuple[float, float]]], indices: list[int]) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    for i in indices:
        arc = arcs[i] if i >= 0 else arcs[~i][::-1]
        pts.extend(arc[1:] if pts else arc)
    return pts


def unwrap(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Longitudes made continuous: a ring across the antimeridian goes past 180 instead of
    jumping back across the whole map."""
    out = [pts[0]]
    for lon, lat in pts[1:]:
        prev = out[-1][0]
        while lon - prev > 180:
            lon -= 360
        while prev - lon > 180:
            lon += 360
        out.append((lon, lat))
    return out


def path_of(pts: list[tuple[float, float]], shift: float = 0.0) -> str:
    xy = [(round(lon + 180 + shift, 1), round(90 - lat, 1)) for lon, lat in pts]
    out = [xy[0]] + [p for prev, p in itertools.pairwise(xy) if p != prev]
    return "M" + "L".join(f"{x:g} {y:g}" for x, y in out) + "Z"


def paths_of(pts: list[tuple[float, float]]) -> list[str]:
    """The ring's path, and its copy a world away where it crosses the map's edge (the
    viewBox clips both to the map)."""
    pts = unwrap(pts)
    lons = [lon for lon, _ in pts]
    paths = [path_of(pts)]
    if max(lons) > 180:
        paths.append(path_of(pts, -360))
    if min(lons) < -180:
        paths.append(path_of(pts, 360))
    return paths


def main(src: str, dst: str) -> None:
    topo = json.loads(Path(src).read_text())
    arcs = decode_arcs(topo)
    parts = []
    for geom in topo["objects"]["countries"]["geometries"]:
        polys = geom.get("arcs") or []
        if geom["type"] == "Polygon":
            polys = [polys]
        for poly in polys:
            for r in poly:
                pts = ring(arcs, r)
                if len(pts) > 2 and max(lat for _, lat in pts) > SOUTH:
                    parts.extend(paths_of(pts))
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 360 {HEIGHT:g}" '
        f'width="360" height="{HEIGHT:g}">'
        "<!-- Natural Earth 1:110m countries (public domain) via world-atlas 2.0.2 (ISC) -->"
        f'<path fill="#e3e8ef" stroke="#b9c2cf" stroke-width="0.15" '
        f'stroke-linejoin="round" d="{"".join(parts)}"/></svg>\n'
    )
    Path(dst).write_text(svg)


if __name__ == "__main__":
    main(*sys.argv[1:3])
