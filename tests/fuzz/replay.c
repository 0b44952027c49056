/* replay.c — runs a fuzz target without libFuzzer (the ctest build): every file of the corpus
 * directories or files given, then FUZZ_RUNS (default 20000) inputs generated from a fixed seed,
 * so that the property is checked on every run of the suite and a failure reproduces. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REPLAY_RUNS_DEFAULT 20000
#define REPLAY_MAX_INPUT    4096

static size_t run_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	uint8_t buf[REPLAY_MAX_INPUT];
	if (f == NULL) {
		perror(path);
		exit(1);
	}
	size_t n = fread(buf, 1, sizeof buf, f);
	fclose(f);
	LLVMFuzzerTestOneInput(buf, n);
	return 1;
}

static size_t run_path(const char *path)
{
	struct stat st;
	size_t n = 0;
	if (stat(path, &st) != 0) {
		perror(path);
		exit(1);
	}
	if (!S_ISDIR(st.st_mode))
		return run_file(path);
	DIR *d = opendir(path);
	struct dirent *e;
	while (d != NULL && (e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		char p[4096];
		snprintf(p, sizeof p, "%s/%s", path, e->d_name);
		n += run_file(p);
	}
	if (d != NULL)
		closedir(d);
	return n;
}

int main(int argc, char **argv)
{
	const char *env = getenv("FUZZ_RUNS");
	long runs = env ? strtol(env, NULL, 10) : REPLAY_RUNS_DEFAULT;
	uint64_t x = 0x2545F4914F6CDD1Dull;
	size_t files = 0;

	if (LLVMFuzzerInitialize)
		LLVMFuzzerInitialize(&argc, &argv);
	for (int i = 1; i < argc; i++)
		files += run_path(argv[i]);
	for (long r = 0; r < runs; r++) {
		uint8_t buf[512];
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		size_t n = 2 + x % (sizeof buf - 2);
		for (size_t i = 0; i < n; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			buf[i] = (uint8_t)(x >> 24);
		}
		LLVMFuzzerTestOneInput(buf, n);
	}
	printf("replayed %zu corpus files and %ld generated inputs\n", files, runs);
	return 0;
}
