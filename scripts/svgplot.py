"""A minimal SVG line plot for the result pages (standard library only)."""


def svg_lines(title, xlabel, ylabel, series, path):
    """series: [(label, color, [(x, y), ...])]"""
    W, H, L, B, T, R = 640, 400, 70, 50, 40, 170
    pts = [p for _, _, s in series for p in s]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - B - T)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W/2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
           f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
           f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(T+H-B)/2}" text-anchor="middle" transform="rotate(-90 16 {(T+H-B)/2})">{ylabel}</text>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{sx(xv)}" y="{H-B+16}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{L-6}" y="{sy(yv)+4}" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<line x1="{L}" y1="{sy(yv)}" x2="{W-R}" y2="{sy(yv)}" stroke="#ddd"/>')
    for k, (label, color, s) in enumerate(series):
        if s:
            d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(s))
            out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<rect x="{W-R+10}" y="{T+18*k}" width="12" height="12" fill="{color}"/><text x="{W-R+28}" y="{T+18*k+10}">{label}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))
