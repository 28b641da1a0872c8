"""Looking at routing: traces and the paper's statistics, plots, the HTML explorer, token display."""
