def write_report(out):
    return "report pending"
