"""Hardware-in-the-loop bench suites and the reports that gate campaigns."""
