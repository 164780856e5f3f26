//! Plain-text aligned tables for `pcguard check` and `pcguard catalog`.

/// Formats `rows` under `headers` with every column padded to its widest
/// cell (the last column is not padded). Lines end with `\n`.
pub fn aligned(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    std::iter::once(&header).chain(rows).map(|row| format_row(&widths, row)).collect()
}

fn format_row(widths: &[usize], row: &[String]) -> String {
    let last = row.len().saturating_sub(1);
    let mut line = String::new();
    for (i, cell) in row.iter().enumerate() {
        if i == last {
            line.push_str(cell);
        } else {
            let pad = widths[i] - cell.chars().count();
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', pad + 2));
        }
    }
    line.truncate(line.trim_end().len());
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns_to_the_widest_cell() {
        let rows = vec![
            vec!["web-http".to_string(), "9191".to_string(), "x".to_string()],
            vec!["a".to_string(), "49152-65535".to_string(), "".to_string()],
        ];
        let t = aligned(&["ID", "PORTS", "PEERS"], &rows);
        assert_eq!(t, "ID        PORTS        PEERS\nweb-http  9191         x\na         49152-65535\n");
    }
}
