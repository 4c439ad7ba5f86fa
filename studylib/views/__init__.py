"""What a person looks at: plotly figures, JupyterLab widgets, the segmentation gallery and the HTML report."""
