"""What people use: the command line, batch jobs, the Gradio app, pipeline loading and result writing."""
