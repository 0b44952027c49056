/* main.c — command line: run the gateway, or validate a configuration file (-t). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config.h"
#include "sluice/log.h"
#include "sluice/server.h"

#define DEFAULT_CONFIG "/etc/sluice/sluice.yaml"

static void usage(FILE *f)
{
	fprintf(f, "usage: sluice [-c FILE] [-t] [-v]\n"
	           "  -c, --config FILE  configuration file (default " DEFAULT_CONFIG ")\n"
	           "  -t, --test         validate the configuration and exit (0 valid, 1 invalid)\n"
	           "  -v, --version      print the version and exit\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"test", no_argument, NULL, 't'},
		{"version", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *path = DEFAULT_CONFIG;
	bool test_only = false;
	int ch;

	while ((ch = getopt_long(argc, argv, "c:tvh", opts, NULL)) != -1) {
		switch (ch) {
		case 'c': path = optarg; break;
		case 't': test_only = true; break;
		case 'v': printf("sluice %s\n", SLUICE_VERSION); return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 2;
	}

	struct config_errors errs = {0};
	struct config *cfg = config_load(path, &errs);
	if (cfg == NULL) {
		for (size_t i = 0; i < errs.n; i++)
			fprintf(stderr, "%s\n", errs.msgs[i]);
		if (errs.dropped)
			fprintf(stderr, "... and %zu more errors\n", errs.dropped);
		fprintf(stderr, "sluice: configuration %s is invalid\n", path);
		config_errors_free(&errs);
		return 1;
	}
	if (test_only) {
		printf("sluice: configuration %s is valid (%zu instances, %zu routes, %zu consumers)\n",
		       path, cfg->n_instances, cfg->n_routes, cfg->n_consumers);
		config_unref(cfg);
		return 0;
	}
	return server_run(cfg, path);
}
