document.querySelectorAll("th.sortable").forEach(th => th.addEventListener("click", () => {
  const body = document.querySelector("tbody"), column = th.cellIndex;
  const up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
  const key = row => { const v = row.cells[column].dataset.v; return v === "" ? null : isNaN(v) ? v : +v; };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  });
  rows.forEach(row => body.appendChild(row));
}));
