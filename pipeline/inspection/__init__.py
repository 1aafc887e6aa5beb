"""Looking at what a run made: the stores of a project, their statistics, figures, the HTML
gallery, comparisons with another revision, and the metrics report."""
