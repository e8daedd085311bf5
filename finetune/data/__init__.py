"""Reading raw examples, splitting them and preparing the splits a task trains and evaluates on."""
